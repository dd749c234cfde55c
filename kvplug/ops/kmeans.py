"""k-means of key vectors, one clustering per kv head (squared L2), for cluster-level KV retrieval.

Functions:
    kmeans_step_ref(keys, centroids)        torch spec of one Lloyd iteration (fp32 math)
    kmeans_step(keys, centroids, backend)   dispatcher (cuda -> triton -> torch)
    kmeans_init(keys, n_clusters, seed, init)  deterministic kmeans++ / random initial centroids (torch)
    kmeans_keys(keys, n_clusters, iters, seed, init, backend)  init + `iters` Lloyd steps
"""
import torch

from kvplug.ops import _backend

OP = "kmeans_step"
INITS = ("kmeans++", "random")


def kmeans_step_ref(keys: torch.Tensor, centroids: torch.Tensor):
    """One Lloyd iteration per kv head.

    keys [T, H, D] fp16/bf16/fp32; centroids [H, C, D] (any float dtype, used as fp32).
    assign[h, t] = argmin_c ||keys[t, h] - centroids[h, c]||^2 (lowest c on exact ties),
    computed as ||c||^2 - 2 x.c in fp32 (||x||^2 does not change the argmin).
    sizes[h, c] = #members; new_centroids[h, c] = mean of members, or the old centroid
    when the cluster is empty.
    Returns (new_centroids fp32 [H, C, D], assign int64 [H, T], sizes int64 [H, C]).
    """
    _check(keys, centroids)
    x = keys.float().transpose(0, 1)  # [H, T, D]
    c = centroids.float()
    dist = (c * c).sum(-1).unsqueeze(1) - 2.0 * torch.bmm(x, c.transpose(1, 2))  # [H, T, C]
    assign = dist.argmin(dim=2) if x.shape[1] > 0 else dist.new_empty(dist.shape[:2], dtype=torch.int64)
    return update_ref(x, c, assign)


def update_ref(x: torch.Tensor, c: torch.Tensor, assign: torch.Tensor):
    """Member means of x [H, T, D] fp32 grouped by assign [H, T]; empty clusters keep c."""
    H, _, D = x.shape
    C = c.shape[1]
    sizes = torch.zeros(H, C, dtype=torch.int64, device=x.device).scatter_add_(1, assign, torch.ones_like(assign))
    sums = torch.zeros(H, C, D, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, D), x)
    mean = sums / sizes.clamp(min=1).unsqueeze(-1).to(torch.float32)
    return torch.where(sizes.unsqueeze(-1) > 0, mean, c).contiguous(), assign, sizes


def _check(keys: torch.Tensor, centroids: torch.Tensor) -> None:
    if keys.dim() != 3:
        raise ValueError(f"kmeans: keys must be [T, H, D], got shape {tuple(keys.shape)}")
    if keys.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kmeans: keys dtype {keys.dtype} is not fp16/bf16/fp32")
    T, H, D = keys.shape
    if centroids.dim() != 3 or centroids.shape[0] != H or centroids.shape[2] != D or centroids.shape[1] < 1:
        raise ValueError(f"kmeans: centroids must be [H={H}, C>=1, D={D}], got shape {tuple(centroids.shape)}")
    if not centroids.is_floating_point() or centroids.device != keys.device:
        raise ValueError(f"kmeans: centroids {centroids.dtype} on {centroids.device} must be float on {keys.device}")


@torch.library.custom_op("kvplug::kmeans_step", mutates_args=())
def _kmeans_step_op(keys: torch.Tensor, centroids: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _backend.choose(OP, keys.device, backend)
    if impl == "torch":
        return kmeans_step_ref(keys, centroids)
    T, H, D = keys.shape  # kernels read dense [H, D] rows (strides of size-1 dims are free)
    if not ((H <= 1 or keys.stride(1) == D) and (D <= 1 or keys.stride(2) == 1)):
        keys = keys.contiguous()
    centroids = centroids.float().contiguous()
    if impl == "cuda":
        return _backend.cuda_ops().kmeans_step(keys, centroids)
    from kvplug._triton.kmeans import kmeans_step_triton

    return kmeans_step_triton(keys, centroids)


@_kmeans_step_op.register_fake
def _(keys, centroids, backend):
    T, H, D = keys.shape
    C = centroids.shape[1]
    return (keys.new_empty((H, C, D), dtype=torch.float32), keys.new_empty((H, T), dtype=torch.int64),
            keys.new_empty((H, C), dtype=torch.int64))


def kmeans_step(keys: torch.Tensor, centroids: torch.Tensor, backend: str = "auto"):
    """Same contract as kmeans_step_ref; `backend` is auto|cuda|triton|torch."""
    _check(keys, centroids)
    return _kmeans_step_op(keys, centroids, backend)


def kmeans_init(keys: torch.Tensor, n_clusters: int, seed: int, init: str = "kmeans++") -> torch.Tensor:
    """Initial centroids fp32 [H, C, D], a function of (keys, n_clusters, seed, init) only.

    "random": C distinct keys per head (with repeats only when C > T).
    "kmeans++": first centre uniform, each next sampled with probability ~ squared
    distance to the nearest chosen centre (uniform when all distances are zero).
    """
    if init not in INITS:
        raise ValueError(f"kmeans: init={init!r}: allowed values are {', '.join(INITS)}")
    if n_clusters < 1:
        raise ValueError(f"kmeans: n_clusters={n_clusters} must be >= 1")
    x = keys.float().transpose(0, 1)  # [H, T, D]
    H, T, D = x.shape
    if T == 0:
        raise ValueError(f"kmeans: keys shape {tuple(keys.shape)} has no tokens to cluster")
    g = torch.Generator(device=keys.device).manual_seed(int(seed))
    if init == "random":
        if n_clusters <= T:
            idx = torch.rand(H, T, generator=g, device=keys.device).argsort(dim=1)[:, :n_clusters]
        else:
            idx = torch.randint(T, (H, n_clusters), generator=g, device=keys.device)
        return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, D)).contiguous()
    return _kmeans_pp(x, n_clusters, g)


def _kmeans_pp(x: torch.Tensor, n_clusters: int, g: torch.Generator) -> torch.Tensor:
    H, T, D = x.shape
    out = x.new_empty(H, n_clusters, D)
    idx = torch.randint(T, (H, 1), generator=g, device=x.device)
    out[:, 0] = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, D)).squeeze(1)
    d2 = (x - out[:, :1]).square().sum(-1)  # [H, T] distance to the nearest chosen centre
    for i in range(1, n_clusters):
        # all-zero rows (every key already a centre) would make multinomial fail: go uniform
        w = torch.where(d2.sum(1, keepdim=True) > 0, d2, torch.ones_like(d2))
        idx = torch.multinomial(w, 1, generator=g)
        out[:, i] = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, D)).squeeze(1)
        d2 = torch.minimum(d2, (x - out[:, i:i + 1]).square().sum(-1))
    return out


def kmeans_keys(keys: torch.Tensor, n_clusters: int, iters: int = 10, seed: int = 0,
                init: str = "kmeans++", backend: str = "auto"):
    """k-means per kv head: init, then `iters` Lloyd steps.

    Returns (centroids fp32 [H, C, D], assign int64 [H, T], sizes int64 [H, C]) where
    assign/sizes are the last step's partition and centroids are its member means
    (empty clusters keep their previous centroid). iters=0 returns the initial
    centroids with the assignment to them. Deterministic for a seed on one device.
    """
    if iters < 0:
        raise ValueError(f"kmeans: iters={iters} must be >= 0")
    centroids = kmeans_init(keys, n_clusters, seed, init)
    new, assign, sizes = kmeans_step(keys, centroids, backend)
    for _ in range(iters - 1):
        new, assign, sizes = kmeans_step(keys, new, backend)
    return (new if iters > 0 else centroids), assign, sizes
