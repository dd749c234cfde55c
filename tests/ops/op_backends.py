"""The backends an op's tests run, as test parameters: every backend the op has, and the ones
this machine cannot run shown as skips that say why (never dropped without a word).

    op_backends(op, cuda=True) -> [pytest.param]   torch, triton, and cuda when the op has a CUDA kernel
"""
import pytest
import torch

from kvplug import envs
from kvplug.ops import _backend


def _skip_unless(why: str | None):
    return pytest.mark.skipif(why is not None, reason=why or "")


def op_backends(op: str, cuda: bool = True) -> list:
    if not _backend.has_triton():
        triton_why = "triton is not installed"
    elif not (torch.cuda.is_available() or envs.triton_interpret()):
        triton_why = "no CUDA device and TRITON_INTERPRET is not 1"
    else:
        triton_why = None
    out = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=_skip_unless(triton_why))]
    if cuda:
        if not torch.cuda.is_available():
            cuda_why = "no CUDA device"
        elif not _backend.has_cuda_op(op):
            cuda_why = f"kvplug._C is not built (or has no {op})"
        else:
            cuda_why = None
        out.append(pytest.param("cuda", id="cuda", marks=_skip_unless(cuda_why)))
    return out
