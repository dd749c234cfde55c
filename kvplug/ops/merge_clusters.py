"""Size-weighted cluster merge of K/V.

Each cluster's keys and values become their member mean and carry log(count) as an
attention bias: one merged entry with bias log(n) receives exactly the softmax mass of
n identical copies of it, so the merged cache stands in for the full one. Attention over
the result is kvplug.ops.attend_merged: attend_merged(q, merged_k, merged_v, log_size)
(an empty cluster's -inf bias gives it zero weight).

Functions:
    merge_clusters_ref(keys, values, assign, n_clusters)         torch spec (fp32 math)
    merge_clusters(keys, values, assign, n_clusters, backend)    dispatcher (cuda -> triton -> torch)
"""
import torch

from kvplug.ops import _backend

OP = "merge_clusters"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def merge_clusters_ref(keys: torch.Tensor, values: torch.Tensor, assign: torch.Tensor, n_clusters: int):
    """Member means of K and V per (kv head, cluster).

    keys, values [T, H, D] (one fp16/bf16/fp32 dtype); assign int64 [H, T] with values
    in [0, n_clusters). Means are summed in fp32 and rounded once to keys.dtype.
    Returns (merged_k [H, C, D], merged_v [H, C, D], log_size fp32 [H, C]) where
    log_size = log(#members), -inf for an empty cluster (whose K/V are 0).
    """
    _check(keys, values, assign, n_clusters)
    H, T, D = keys.shape[1], keys.shape[0], keys.shape[2]
    sizes = torch.zeros(H, n_clusters, dtype=torch.int64, device=keys.device)
    sizes.scatter_add_(1, assign, torch.ones_like(assign))
    index = assign.unsqueeze(-1).expand(-1, -1, D)
    out = []
    for t in (keys, values):
        sums = torch.zeros(H, n_clusters, D, dtype=torch.float32, device=keys.device)
        sums.scatter_add_(1, index, t.float().transpose(0, 1))
        out.append((sums / sizes.clamp(min=1).unsqueeze(-1).float()).to(keys.dtype))
    return out[0], out[1], torch.log(sizes.float())


def _check(keys, values, assign, n_clusters) -> None:
    if keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"merge_clusters: keys {tuple(keys.shape)} and values {tuple(values.shape)} "
                         "must both be [T, H, D]")
    if keys.dtype not in FLOATS or values.dtype != keys.dtype:
        raise ValueError(f"merge_clusters: keys {keys.dtype} / values {values.dtype} must be one of fp16/bf16/fp32")
    T, H, _ = keys.shape
    if assign.shape != (H, T) or assign.dtype != torch.int64:
        raise ValueError(f"merge_clusters: assign {tuple(assign.shape)} {assign.dtype} must be int64 [H={H}, T={T}]")
    if not (keys.device == values.device == assign.device):
        raise ValueError("merge_clusters: keys, values and assign must be on one device")
    if n_clusters < 1:
        raise ValueError(f"merge_clusters: n_clusters={n_clusters} must be >= 1")


def _rows_dense(t: torch.Tensor) -> torch.Tensor:
    # dense [H, D] rows, any token stride; strides of size-1 dims are free (.contiguous() keeps them)
    dense = (t.shape[1] <= 1 or t.stride(1) == t.shape[2]) and (t.shape[2] <= 1 or t.stride(2) == 1)
    return t if dense else t.contiguous()


@torch.library.custom_op("kvplug::merge_clusters", mutates_args=())
def _merge_clusters_op(keys: torch.Tensor, values: torch.Tensor, assign: torch.Tensor, n_clusters: int,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _backend.choose(OP, keys.device, backend)
    if impl == "torch":
        return merge_clusters_ref(keys, values, assign, n_clusters)
    keys, values, assign = _rows_dense(keys), _rows_dense(values), assign.contiguous()
    if keys.shape[0] > 1 and keys.stride(0) != values.stride(0):  # CUDA walks K and V with one token stride
        keys, values = keys.contiguous(), values.contiguous()
    if impl == "cuda":
        return _backend.cuda_ops().merge_clusters(keys, values, assign, n_clusters)
    from kvplug._triton.merge_clusters import merge_clusters_triton

    return merge_clusters_triton(keys, values, assign, n_clusters)


@_merge_clusters_op.register_fake
def _(keys, values, assign, n_clusters, backend):
    H, D = keys.shape[1], keys.shape[2]
    return (keys.new_empty((H, n_clusters, D)), keys.new_empty((H, n_clusters, D)),
            keys.new_empty((H, n_clusters), dtype=torch.float32))


def merge_clusters(keys: torch.Tensor, values: torch.Tensor, assign: torch.Tensor, n_clusters: int,
                   backend: str = "auto"):
    """Same contract as merge_clusters_ref; `backend` is auto|cuda|triton|torch."""
    _check(keys, values, assign, int(n_clusters))
    return _merge_clusters_op(keys, values, assign, int(n_clusters), backend)

