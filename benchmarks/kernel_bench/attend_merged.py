"""Cases for attend_merged (see kernel_bench's contract): a 64-token chunk of Llama-3-8B queries
(32 q heads, 8 kv heads, head 128, bf16) attending over E merged entries per kv head (bf16
merged K/V, bias log(cluster size) with 1..32 members, the last 1/16 padding at -inf).
Bound by the two dot products: rate in FLOPs, 4 * Q * Hq * E * D (q.k and weights @ values).

--check compares out with atol 2u * max|v| + 1e-5 (u = the values' unit roundoff: the Triton
path rounds the softmax weights to bf16 once) and lse within 1e-5 (AttendCheck).

Classes:
    AttendCheck(out, lse, atol)   == compares out within atol and lse within 1e-5
"""
from __future__ import annotations

import torch

from kernel_bench import Case, device
from kvplug.ops.attend_merged import attend_merged, attend_merged_ref

BACKENDS = ("torch", "triton", "cuda")
UNIT_ROUNDOFF = {torch.float32: 1e-6, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


class AttendCheck:
    """Output wrapper: (out, lse) compared with the tolerance each one has."""

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, atol: float):
        self.out, self.lse, self.atol = out, lse, atol

    def __eq__(self, want) -> bool:
        return (self.out.shape == want.out.shape and self.lse.shape == want.lse.shape
                and torch.allclose(self.out, want.out, rtol=1e-5, atol=self.atol)
                and torch.allclose(self.lse, want.lse, rtol=1e-5, atol=1e-5, equal_nan=False))

    def __repr__(self) -> str:
        return f"AttendCheck(out {tuple(self.out.shape)}, lse {tuple(self.lse.shape)})"


def _case(Q: int, Hq: int, Hkv: int, D: int, E: int, dtype=torch.bfloat16):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(Q * 7 + E)
    q = torch.randn(Q, Hq, D, device=dev, dtype=dtype, generator=g)
    keys, values = (torch.randn(Hkv, E, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
    bias = torch.log(torch.randint(1, 33, (Hkv, E), device=dev, generator=g).float())
    bias[:, E - E // 16:] = float("-inf")
    atol = 2 * UNIT_ROUNDOFF[dtype] * max(1.0, float(values.abs().max())) + 1e-5

    def run(backend):
        return AttendCheck(*attend_merged(q, keys, values, bias, backend=backend), atol)

    yield Case("attend_merged", f"Q{Q} Hq{Hq}/{Hkv} D{D} E{E} {str(dtype).split('.')[-1]}",
               flops=4 * Q * Hq * E * D, ref=lambda: AttendCheck(*attend_merged_ref(q, keys, values, bias), atol),
               fns={b: (lambda b=b: run(b)) for b in BACKENDS})


def cases(quick: bool):
    for Q, Hq, Hkv, D, E in ([(4, 4, 2, 64, 257)] if quick else [(64, 32, 8, 128, 2048), (64, 32, 8, 128, 16384)]):
        yield from _case(Q, Hq, Hkv, D, E)
