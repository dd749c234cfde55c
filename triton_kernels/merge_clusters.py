"""Triton: size-weighted cluster merge of K and V (member means + log sizes).

Reuses the deterministic segmented-mean kernel of the k-means update: the merge is the
same grouping applied to values as well as keys.

Functions:
    merge_clusters_triton(keys, values, assign, n_clusters)  (merged_k, merged_v, log_size)
"""
import torch

from .kmeans import group_by_cluster, segment_mean


def merge_clusters_triton(keys: torch.Tensor, values: torch.Tensor, assign: torch.Tensor, n_clusters: int):
    """keys/values [T, H, D] dense rows; assign contiguous int64 [H, T] in [0, n_clusters)."""
    T, H, _ = keys.shape
    if assign.shape != (H, T) or assign.dtype != torch.int64 or not assign.is_contiguous():
        raise ValueError(f"merge_clusters: assign {tuple(assign.shape)} {assign.dtype} must be contiguous "
                         f"int64 [H={H}, T={T}]")
    order, offsets, sizes = group_by_cluster(assign, n_clusters)
    merged_k = segment_mean(keys, order, offsets, sizes, n_clusters, out_dtype=keys.dtype)
    merged_v = segment_mean(values, order, offsets, sizes, n_clusters, out_dtype=values.dtype)
    return merged_k, merged_v, torch.log(sizes.float())
