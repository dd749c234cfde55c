"""Cases for kmeans_step (see kernel_bench's contract): one Lloyd iteration on Llama-3-8B
keys [T, 8, 128] bf16 with T/16 fp32 centroids per kv head. Rate in FLOPs of the
assignment (2 * H * T * C * D), which dominates; the update is a segmented mean.

Assignments computed in different summation orders may differ where two centroids are
equally near, so --check uses StepCheck: an assignment may differ from the reference only
at near-ties, sizes must count the assignment exactly and new centroids must be its means.

Classes:
    StepCheck(keys, centroids, out)  == validates a step's output against the torch spec
"""
from __future__ import annotations

import torch

from kernel_bench import Case, device
from kvplug.ops.kmeans import kmeans_init, kmeans_step, kmeans_step_ref, update_ref

BACKENDS = ("torch", "triton", "cuda")


class StepCheck:
    def __init__(self, keys: torch.Tensor, centroids: torch.Tensor, out):
        self.keys, self.centroids = keys, centroids
        self.new, self.assign, self.sizes = out

    def _dist(self, assign: torch.Tensor) -> torch.Tensor:
        x = self.keys.float().transpose(0, 1)
        c = torch.gather(self.centroids.float(), 1, assign.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return (x - c).square().sum(-1)

    def __eq__(self, want) -> bool:
        diff = self.assign != want.assign
        x = self.keys.float().transpose(0, 1)
        scale = x.square().sum(-1) + self.centroids.float().square().sum(-1).max(1).values[:, None]
        gap = (self._dist(self.assign) - self._dist(want.assign)).abs()
        if not bool((gap[diff] <= 1e-4 * scale[diff]).all()):
            return False
        means, _, sizes = update_ref(x, self.centroids.float(), self.assign)
        return torch.equal(self.sizes, sizes) and torch.allclose(self.new, means, rtol=1e-5, atol=1e-5)

    def __repr__(self) -> str:
        return f"StepCheck(assign {tuple(self.assign.shape)})"


def _case(T: int, H: int, D: int, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(T)
    C = max(1, T // 16)
    keys = torch.randn(T, H, D, device=dev, dtype=dtype, generator=g)
    cen = kmeans_init(keys, C, seed=0, init="random") + 0.01
    yield Case("kmeans_step", f"T{T} H{H} D{D} C{C} {str(dtype).split('.')[-1]}", flops=2 * H * T * C * D,
               ref=lambda: StepCheck(keys, cen, kmeans_step_ref(keys, cen)),
               fns={b: (lambda b=b: StepCheck(keys, cen, kmeans_step(keys, cen, backend=b))) for b in BACKENDS})


def cases(quick: bool):
    for T, H, D in ([(257, 2, 64)] if quick else [(4096, 8, 128), (32768, 8, 128)]):
        yield from _case(T, H, D)
