"""Choosing the implementation of an op: argument, then KVPLUG_<OP>_BACKEND, then the
first available of cuda (kvplug._C built and a CUDA tensor), triton (CUDA tensor, or
CPU tensor under TRITON_INTERPRET=1 when forced), torch.

Methods:
    cuda_ops()                   the torch.ops namespace of kvplug._C, or None
    has_cuda_op(op)              kvplug._C is built and registers `op`
    has_triton()                 triton imports
    choose(op, device, backend)  the backend to run, or ValueError naming what is missing
"""
from __future__ import annotations

import functools

import torch

from kvplug import envs

BACKENDS = envs.BACKENDS


@functools.cache
def cuda_ops():
    try:
        import kvplug._C  # noqa: F401  (registers torch.ops.kvplug_C.*)
    except ImportError:
        return None
    return torch.ops.kvplug_C


def has_cuda_op(op: str) -> bool:
    ops = cuda_ops()
    return ops is not None and hasattr(ops, op)


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose(op: str, device: torch.device, backend: str = "auto") -> str:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend={backend!r}: allowed values are auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = envs.op_backend(op) or "auto"
    if backend == "auto":
        if device.type == "cuda" and has_cuda_op(op):
            return "cuda"
        if device.type == "cuda" and has_triton():
            return "triton"
        return "torch"
    if backend == "cuda" and not (device.type == "cuda" and has_cuda_op(op)):
        raise ValueError(f"{op}: backend 'cuda' needs kvplug._C built with {op} and CUDA tensors (got {device})")
    if backend == "triton":
        if not has_triton():
            raise ValueError(f"{op}: backend 'triton' needs the triton package")
        if device.type != "cuda" and not envs.triton_interpret():
            raise ValueError(f"{op}: backend 'triton' on {device} tensors needs TRITON_INTERPRET=1")
    return backend
