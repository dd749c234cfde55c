"""Benchmark cases for benchmarks/kernels.py, one module per op family.

Module contract (a new module dropped into this folder is picked up, kernels.py is not edited):
    cases(quick: bool) -> Iterable[Case]   (or a module-level CASES list of Case)
        yield the cases lazily: kernels.py times each case and drops it before asking for the
        next, so a generator bounds peak memory to one size. Allocate on `device()`.
        quick=True: sizes that run on CPU in seconds; otherwise realistic Llama-3-8B shapes
        (32 layers, 8 kv heads, head_dim 128, 4K-32K tokens).
    Case(op, name, fns, ref, bytes=..., flops=..., reset=..., tol=...)
        op     the kvplug op name (matches --ops and `_backend.has_cuda_op`)
        name   short label of the shape, e.g. "L32 T4096 bf16"
        fns    {backend: zero-arg callable running the op once and returning its output};
               backends "torch", "triton", "cuda" (dispatcher with backend=...), or a peer name
               ("lmcache"); kernels.py drops the ones not available on this device
        ref    zero-arg callable computing the expected output with the torch spec (<op>_ref)
        bytes  minimum bytes the op must move (reads + writes); flops its FLOP count. Rate
               columns use bytes when > 0, else flops.
        reset  zero-arg callable refilling what an in-place op writes (its output buffer, the
               caches) with the same random values before the reference and before each checked
               run, so a backend that writes nothing cannot pass on the previous one's output
        tol    (rtol, atol) for --check; None: by output dtype (see TOL); ints compare exactly
        ceiling  which measured bandwidth the bytes rate is a share of: "copy" (device copy,
               default), "h2d" / "d2h" (pinned host <-> device copies; the copy ceiling on CPU)
        unchecked  fns names --check skips (a peer or an old path whose output has another layout)
        copies  [(dst, src)] tensors whose torch copy is the case's ceiling (the same bytes the
               op moves; pinned host <-> device for "h2d" / "d2h"); none: the run-wide ceiling
        cuda_op  the op kvplug._C registers that the "cuda" backend runs (default: op); a case
               named after a product path rather than a kernel names the kernel here
Outputs may be a tensor or a tuple/list of tensors.

Methods:
    device()          the torch.device the harness runs on
    set_device(dev)   called once by kernels.py before any cases() call
    compare(got, want, tol)   assert_close over tensors/tuples, exact for integer tensors, on
                              want's device (got is moved there if it lives elsewhere)
    refill(*tensors, seed)    fill tensors with seeded normal values, byte tensors with 0x5A (a Case.reset)
    clone_outputs(x)  deep copy of a tensor/tuple output (in-place ops return live buffers)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

_DEVICE = torch.device("cpu")
_COMPARE_SLICE = 1 << 27


@dataclass
class Case:
    op: str
    name: str
    fns: dict[str, Callable[[], Any]]
    ref: Callable[[], Any]
    bytes: int = 0
    flops: int = 0
    reset: Callable[[], None] | None = None
    tol: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)
    ceiling: str = "copy"
    unchecked: tuple[str, ...] = ()
    cuda_op: str = ""
    copies: list = field(default_factory=list)


def device() -> torch.device:
    return _DEVICE


def set_device(dev: torch.device | str) -> None:
    global _DEVICE
    _DEVICE = torch.device(dev)


def clone_outputs(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(clone_outputs(v) for v in x)
    return x


def compare(got, want, tol: tuple[float, float] | None = None) -> None:
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            raise AssertionError(f"output structure differs: {type(got)} vs {len(want)} items")
        for g, w in zip(got, want):
            compare(g, w, tol)
        return
    if not isinstance(want, torch.Tensor):
        if got != want:
            raise AssertionError(f"{got!r} != {want!r}")
        return
    got = got.to(want.device)
    if not want.is_floating_point():
        if not torch.equal(got, want):
            raise AssertionError(f"integer output differs ({tuple(got.shape)})")
        return
    rtol, atol = tol or TOL.get(want.dtype, (1e-4, 1e-4))
    if got.shape != want.shape:
        raise AssertionError(f"output of shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    g, w = got.reshape(-1), want.reshape(-1)
    for i in range(0, w.numel(), _COMPARE_SLICE):  # fp32 slices: GB-sized outputs stay within memory
        torch.testing.assert_close(g[i:i + _COMPARE_SLICE].float(), w[i:i + _COMPARE_SLICE].float(), rtol=rtol,
                                   atol=atol)


def refill(*tensors: torch.Tensor, seed: int = 1) -> None:
    g = torch.Generator(device=tensors[0].device).manual_seed(seed)
    for t in tensors:
        if t.is_floating_point():
            t.normal_(generator=g)
        else:  # byte rows (pinned host memory, hundreds of MB): a memset; as bf16/fp16 0x5A5A is finite
            t.fill_(0x5A)
