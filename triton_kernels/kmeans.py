"""Triton: one Lloyd step of per-head k-means (assignment + deterministic segmented mean).

Functions:
    kmeans_assign(keys, centroids)        int64 [H, T] nearest centroid (lowest index on ties)
    segment_mean(src, order, offsets, sizes, n_clusters, old, out_dtype)  [H, C, D] member means
    kmeans_step_triton(keys, centroids)   (new_centroids fp32 [H,C,D], assign [H,T], sizes [H,C])
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _assign_kernel(x_ptr, c_ptr, out_ptr, T, C, D, s_xt, s_xh,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (token blocks, heads). dist = ||c||^2 - 2 x.c in fp32 ("ieee": tf32 would
    # flip near-tie assignments); strict < across centroid blocks keeps the lowest index.
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < T
    x = tl.load(x_ptr + t.to(tl.int64)[:, None] * s_xt + h * s_xh + d[None, :],
                mask=tmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    best = tl.full([BLOCK_T], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_T], tl.int64)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        cen = tl.load(c_ptr + (h * C + cc)[:, None].to(tl.int64) * D + d[None, :],
                      mask=cmask[:, None] & (d < D)[None, :], other=0.0)
        dots = tl.dot(x, tl.trans(cen), input_precision="ieee")
        dist = tl.sum(cen * cen, axis=1)[None, :] - 2.0 * dots
        dist = tl.where(cmask[None, :], dist, float("inf"))
        bmin = tl.min(dist, axis=1)
        barg = tl.argmin(dist, axis=1).to(tl.int64) + c0
        better = bmin < best
        best = tl.where(better, bmin, best)
        best_i = tl.where(better, barg, best_i)
    tl.store(out_ptr + h.to(tl.int64) * T + t, best_i, mask=tmask)


@triton.jit
def _segment_mean_kernel(src_ptr, order_ptr, off_ptr, size_ptr, old_ptr, out_ptr, T, C, D, s_t, s_h,
                         HAS_OLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (head, cluster): sums its members in `order` (stable sort of the
    # assignment), so the result is bit-identical run to run (no float atomics).
    pid = tl.program_id(0)
    h = pid // C
    n = tl.load(size_ptr + pid)
    start = tl.load(off_ptr + pid)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for m0 in range(0, n, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        rows = tl.load(order_ptr + h.to(tl.int64) * T + start + m, mask=m < n, other=0)
        v = tl.load(src_ptr + rows[:, None] * s_t + h * s_h + d[None, :],
                    mask=(m < n)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v, axis=0)
    mean = acc / tl.maximum(n, 1).to(tl.float32)
    if HAS_OLD:
        mean = tl.where(n > 0, mean, tl.load(old_ptr + pid.to(tl.int64) * D + d, mask=dmask, other=0.0))
    tl.store(out_ptr + pid.to(tl.int64) * D + d, mean.to(out_ptr.dtype.element_ty), mask=dmask)


def _check_keys(name: str, keys: torch.Tensor) -> None:
    dense = keys.dim() == 3 and (keys.shape[1] <= 1 or keys.stride(1) == keys.shape[2]) and (
        keys.shape[2] <= 1 or keys.stride(2) == 1)  # strides of size-1 dims are free
    if not dense:
        raise ValueError(f"kmeans: {name} shape {tuple(keys.shape)} strides {keys.stride()}: "
                         "must be [T, H, D] with dense [H, D] rows")
    if keys.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kmeans: {name} dtype {keys.dtype} is not fp16/bf16/fp32")


def kmeans_assign(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """keys [T, H, D] (dense rows), centroids fp32 contiguous [H, C, D] -> int64 [H, T]."""
    _check_keys("keys", keys)
    T, H, D = keys.shape
    if (centroids.dtype != torch.float32 or not centroids.is_contiguous() or centroids.dim() != 3
            or centroids.shape[0] != H or centroids.shape[2] != D or centroids.shape[1] < 1):
        raise ValueError(f"kmeans: centroids {tuple(centroids.shape)} {centroids.dtype} must be "
                         f"contiguous fp32 [H={H}, C>=1, D={D}]")
    C = centroids.shape[1]
    out = torch.empty((H, T), dtype=torch.int64, device=keys.device)
    if T == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    block_c = 32 if block_d <= 128 else 16
    grid = (triton.cdiv(T, 32), H)
    _assign_kernel[grid](keys, centroids, out, T, C, D, keys.stride(0), keys.stride(1),
                         BLOCK_T=32, BLOCK_C=block_c, BLOCK_D=block_d)
    return out


def segment_mean(src, order, offsets, sizes, n_clusters, old=None, out_dtype=torch.float32):
    """Member means of src [T, H, D] grouped per head: order [H, T] lists tokens cluster by
    cluster (stable argsort of the assignment), offsets/sizes [H, C] int64 locate each
    cluster in it. Empty clusters take `old` [H, C, D] fp32 when given, else 0."""
    _check_keys("src", src)
    T, H, D = src.shape
    C = int(n_clusters)
    out = torch.empty((H, C, D), dtype=out_dtype, device=src.device)
    if H * C == 0:
        return out
    if old is not None and (old.shape != out.shape or old.dtype != torch.float32 or not old.is_contiguous()):
        raise ValueError(f"kmeans: old centroids {tuple(old.shape)} {old.dtype} must be contiguous fp32 {tuple(out.shape)}")
    block_d = max(16, triton.next_power_of_2(D))
    _segment_mean_kernel[(H * C,)](src, order, offsets, sizes, old if old is not None else out, out,
                                   T, C, D, src.stride(0), src.stride(1),
                                   HAS_OLD=old is not None, BLOCK_M=16, BLOCK_D=block_d)
    return out


def group_by_cluster(assign: torch.Tensor, n_clusters: int):
    """(order [H, T], offsets [H, C], sizes [H, C]) int64 for segment_mean."""
    H = assign.shape[0]
    sizes = torch.zeros(H, n_clusters, dtype=torch.int64, device=assign.device)
    sizes.scatter_add_(1, assign, torch.ones_like(assign))
    order = torch.argsort(assign, dim=1, stable=True).contiguous()
    offsets = (torch.cumsum(sizes, dim=1) - sizes).contiguous()
    return order, offsets, sizes


def kmeans_step_triton(keys: torch.Tensor, centroids: torch.Tensor):
    assign = kmeans_assign(keys, centroids)
    order, offsets, sizes = group_by_cluster(assign, centroids.shape[1])
    new = segment_mean(keys, order, offsets, sizes, centroids.shape[1], old=centroids)
    return new, assign, sizes
