"""Every vLLM internal kvplug touches, in one place, with a start-up self-test.

The KV connector interface (KVConnectorBase_V1, its metadata and stats classes) is vLLM's public
plugin API and is used where it is needed. What is NOT public lives here: how a connector is
registered by name, how the loaded model is captured, the CPU attention backend's metadata and
kernel call, the rotary module's frequencies, the paged-cache write op and the block grouping.
When a vLLM upgrade changes one of them, this file is the one to fix, and `self_test` turns
blending off with one warning naming the vLLM version instead of failing every request.

    SUPPORTED_VLLM                      the vLLM versions this module was written against
    register_connector(name, module, cls)   KVConnectorFactory registration (idempotent)
    capture_loaded_models(on_load)      wrap the model runners' load_model so on_load(model) runs
    group_kernel_blocks(cache, num_blocks)  a layer's cache viewed block-major
    kv_write(attn, k, v, cache, slots)  the backend's own paged-cache write
    is_cpu_backend(attn) / cpu_paged_metadata(attn, ..., window) / cpu_paged_attention(attn, ...)
    rope_frequencies(rotary_emb)        (inv_freq fp32, "neox"|"gptj"), or ValueError
    TESTED_FAMILIES / architecture(model)   the families checked against transformers; a model's name
    decoder_parts(model) -> (layers, embed)      the decoder layers and the embedding, or ValueError
    layer_parts(arch, i, layer) -> (attn, rotary_emb, window)   layer i's attention module, RoPE module
                                        and sliding window, or ValueError naming what the blender cannot run
    check_layers(adapter, own_forward)  None when every layer re-rotates with its RoPE and (own_forward)
                                        one layer of each kind matches vLLM's own forward, else why not
    layer_tag(vllm_config)              attention implementation and ISA (block interiors differ)
    PagedKVReader(attn, cache)          per-token K/V read back from paged caches of any layout
    self_test(adapter)                  None when the internals behave as expected, else why not
"""
from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("kvplug")

SUPPORTED_VLLM = ">=0.32.0,<0.33"
_ROPES = ("RotaryEmbedding", "Llama3RotaryEmbedding", "LinearScalingRotaryEmbedding")
# The families whose blends are checked tensor by tensor against transformers (tests/e2e/
# test_blend_e2e.py): every other architecture must pass check_layers' comparison with vLLM's own
# forward at start-up. What is family-specific is read per layer by layer_parts (Gemma 3: a RoPE
# module and a sliding window per layer type; its scaled embedding is vLLM's embed_input_ids) or
# refused there (Mistral's t_cond layers, soft caps, sinks, ALiBi, shared KV).
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


def capture_loaded_models(on_load) -> None:
    """A KV connector gets no model handle: record the model each runner loads."""
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
        setattr(cls, "load_model", _recording(load, on_load))


def _recording(load, on_load):
    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        out = load(self, *args, **kwargs)
        on_load(getattr(self, "model", None))
        return out

    load_model._kvplug_wrapped = True
    return load_model


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


# ---- model families -------------------------------------------------------------------------
def architecture(model) -> str:
    """The architecture's name: the config's where vLLM serves it with a generic class."""
    name = type(model).__name__
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return name if not archs or archs[0] == name else f"{archs[0]} (vLLM's {name})"


def decoder_parts(model):
    """(decoder layers, embedding function) of a causal LM laid out as vLLM's own model classes
    are (model.model.layers, model.model.embed_input_ids - which scales Gemma's embeddings)."""
    arch = architecture(model)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not len(layers):
        raise ValueError(f"blend cannot run {arch}: its decoder layers are not at model.layers (set blend=false)")
    if getattr(inner, "start_layer", 0) != 0 or getattr(inner, "end_layer", len(layers)) != len(layers):
        raise ValueError("blend does not support pipeline parallelism")
    embed = getattr(inner, "embed_input_ids", None) or getattr(inner, "embed_tokens", None)
    if embed is None:
        raise ValueError(f"blend cannot run {arch}: no embed_input_ids or embed_tokens")
    return list(layers), embed


def layer_parts(arch: str, i: int, layer):
    """(attention module, RoPE module, sliding window or None) of decoder layer i, or ValueError
    naming the feature the blender does not run."""
    if getattr(layer, "ada_rms_norm_t_cond", None) is not None:
        # Mistral's time-conditioned layers need a t_cond per forward pass; the blender has none.
        raise ValueError(f"blend does not support {arch} layers conditioned on t_cond (ada_rms_norm_t_cond)")
    self_attn = getattr(layer, "self_attn", None)
    attn, rotary = getattr(self_attn, "attn", None), getattr(self_attn, "rotary_emb", None)
    if attn is None or getattr(attn, "impl", None) is None or rotary is None:
        raise ValueError(f"blend cannot run {arch}: layer {i} has no self_attn.attn with an attention backend and "
                         f"self_attn.rotary_emb (set blend=false)")
    impl, name = attn.impl, getattr(attn, "layer_name", i)
    if str(getattr(attn, "attn_type", "decoder")) not in ("decoder", "AttentionType.DECODER"):
        raise ValueError(f"blend supports causal decoder attention only; {arch} layer {name} is {attn.attn_type}")
    found = [what for what, on in (("soft-capped attention logits", getattr(impl, "logits_soft_cap", 0)),
                                   ("ALiBi", getattr(impl, "alibi_slopes", None) is not None),
                                   ("attention sinks", getattr(impl, "sinks", None) is not None),
                                   ("KV shared across layers", getattr(attn, "kv_sharing_target_layer_name", None)))
             if on]
    if found:
        raise ValueError(f"blend does not support {' and '.join(found)} ({arch}, {name}; set blend=false)")
    window = getattr(attn, "sliding_window", None)
    return attn, rotary, (int(window) if window else None)


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
