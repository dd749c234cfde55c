"""Blending: the KV of a prompt span built from cached chunks, recomputing only what matters.

    Blender(adapter, store, check_layer, head_tokens)
    Blender.run(job) -> BlendReport          fill the engine's cache for positions [job.start, job.end)
    Blender.compute_chunk(tokens) -> kv      a chunk's own KV [L, 2, n, KV, D] at positions 0..n-1
    Blender.chunk_payload(slots, begin) -> uint8   a chunk's KV read back from the engine's cache, keys
                                             rotated to the chunk's own positions 0..n-1 (what is stored)
    Blender.chunk_kv(payload) -> kv          the stored bytes viewed as [L, 2, n, KV, D]

How `run` works (CacheBlend's frame; which tokens are recomputed is the policy's, selection.py):
1. Every cached chunk overlapping [0, end) comes from job.chunk_kv (the worker loaded them) or
   the store; chunks too short to cache (key None) are recomputed in every layer. A chunk with a
   key that is not there is an error: the scheduler claims only chunks some tier holds, and vLLM
   computes everything after the first that misses.
2. Cached keys are re-rotated from their positions inside the chunk to their positions in the
   prompt, so the concatenation is a complete, approximate KV for [0, end).
3. The policy picks the tokens to recompute, within round(ratio x cached tokens): from the
   question's attention over that KV (a pass of the question alone, ProphetKV), and/or from the
   deviation of fresh vs cached KV at the check layer after layers 0..check ran on every span
   token (CacheBlend), plus the chunk heads it always takes (EPIC).
4. The picked tokens run through the layers (all of them, or those after the check layer); their
   fresh KV replaces the cached KV at their positions, everyone else keeps the cached KV. With
   ratio 0 nothing runs: the cache gets the re-rotated concatenation. With ratio 1 every span
   token is recomputed in every layer: a full prefill of the span.
Writes and reads of the engine's cache use the adapter's all-layer methods where it has them
(write_rerotated, write_kv_layers, read_kv_layers: one kernel launch each on GPU), else write_kv /
read_kv per layer. Without a paged plan nothing reads the engine's cache during a run, so every
layer is written once, at the end; with ratio 0 and every chunk cached the keys are re-rotated as
they are written (write_rerotated) and the engine's prefix is never read.
Positions [0, start) are already in the engine's cache (its prefix cache, or kvplug's prefix
tiers): they are read back from it, attended to as they are, and never written.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvplug.blend import clusters as kc
from kvplug.blend.adapter import ModelAdapter
from kvplug.blend.clusters import SpanClusters
from kvplug.blend.relevance import question_pass
from kvplug.blend.selection import (POLICIES, adaptive_budget, chunk_heads, combine, deviation, global_budget,
                                   per_chunk_budget, pick_tokens)
from kvplug.ops.rope import rerotate_keys

QUESTION_TOKENS = 256  # the relevance passes run at most the question's last 256 tokens
_QUERY_BLOCK = 256  # queries per attention call: bounds the [H, q, k] score matrix
_MASS_STRIDE = 4  # the adaptive estimator samples every 4th token of a chunk


@dataclass
class BlendJob:
    tokens: list[int]  # prompt tokens, at least [0, end)
    start: int  # first position to write: the engine holds [0, start) already
    end: int  # positions [start, end) are written
    chunks: list[tuple[int, int, bytes | None]]  # (begin, stop, key) tiling [0, >= end); key None: never cached
    slots: torch.Tensor  # int64 [end - start], cache slot of each written position
    ratio: float
    policy: str = "fixed"
    # The request's blocks from position 0: with it (and an adapter that has paged_plan) the
    # engine's attention kernel reads its own cache, which then holds [0, start) and each layer's
    # blended KV before that layer's attention runs.
    block_table: torch.Tensor | None = None
    tail: list[int] = field(default_factory=list)  # the question (relevance)
    tail_at: int | None = None  # position of tail[0] (>= end; None: end, right after the span)
    chunk_kv: Mapping[bytes, torch.Tensor] | None = None  # cached chunks' KV; None: from the blender's store
    prefix_slots: torch.Tensor | None = None  # int64 [start]: where the engine holds [0, start); None: slots 0..
    chunk_clusters: Mapping | None = None  # cached chunks' key clusters (kvplug/blend/clusters.py), by key


@dataclass
class BlendReport:
    tokens: int = 0  # positions written
    recomputed: int = 0  # of which recomputed in the layers after the selection
    chunk_hits: int = 0
    picked: list[int] = field(default_factory=list)  # those positions, as offsets into the span


class Blender:
    def __init__(self, adapter: ModelAdapter, store, check_layer: int = 1, head_tokens: int = 0,
                 cluster_tokens: int = 0, cluster_min_tokens: int = 0, cluster_top: int = 8):
        """cluster_tokens: tokens per key cluster stored with each chunk (0: none); spans of at
        least cluster_min_tokens (0: never) run the relevance pass through the clusters."""
        self.m, self.store = adapter, store
        self.check_layer = min(max(check_layer, 0), adapter.num_layers - 1)
        self.head_tokens = head_tokens
        self.cluster_tokens, self.cluster_min_tokens, self.cluster_top = cluster_tokens, cluster_min_tokens, cluster_top

    # ---- one request ---------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, job: BlendJob) -> BlendReport:
        _check_job(job)
        spec = POLICIES[job.policy]
        report = BlendReport(tokens=job.end - job.start)
        span, moves, chunk_of, begins = self._gather(job, report)
        n = job.end - job.start
        budgeted = job.ratio > 0 and bool((chunk_of >= 0).any())
        if not budgeted and not bool((chunk_of < 0).any()):  # nothing runs: the moved concatenation
            self._write_moved(span, moves, job)
            return report
        kv = self._with_prefix(job, self._rotated(span, moves))
        # With relevance from the question over the cached KV, the pick needs no pass over the
        # span: only the picked tokens ever run. Deviation needs layers 0..check on every token.
        select_at = self.check_layer if budgeted and spec.runs_check_pass else None
        prophet = self._prophet(job, kv) if budgeted and spec.uses_relevance and spec.relevance == "prophet" \
            and job.tail else None
        if select_at is not None:
            active = torch.arange(n)
        elif budgeted:
            active = self._select(job, spec, None, {}, chunk_of, begins, None, prophet)
        else:
            active = torch.nonzero(chunk_of < 0).flatten()
        if active.numel() == 0:
            self._write_span(kv[:, :, job.start:], job)
            return report
        active = self._recompute(job, spec, kv, active, select_at, (chunk_of, begins), prophet)
        report.recomputed = int(active.numel())
        report.picked = active.tolist()
        return report

    def _recompute(self, job: BlendJob, spec, kv: torch.Tensor, active: torch.Tensor, select_at: int | None,
                   chunks, prophet) -> torch.Tensor:
        """The active span tokens through every layer (at select_at the policy picks who goes on),
        their fresh KV into kv and the engine's cache. Returns the tokens the last layers ran."""
        chunk_of, begins = chunks
        dev = self.m.device
        ids = torch.tensor(job.tokens[job.start:job.end], dtype=torch.long, device=dev)
        positions = torch.arange(job.start, job.end, device=dev)
        paged = job.block_table is not None and getattr(self.m, "paged_plan", None) is not None
        hidden, residual = self.m.embed(ids[active.to(dev)]), None
        q_pos = None
        # The question runs beside the span up to the check layer (never written) when its
        # attention there says which chunks or tokens it reads.
        question = self._Question(self, job) if select_at is not None and spec.uses_relevance and \
            spec.relevance == "check" and job.tail else None
        for i in range(self.m.num_layers):
            if q_pos is None:  # the first layer, and after the selection
                q_pos = positions[active.to(dev)]
                plan = self.m.paged_plan(q_pos, job.block_table) if paged else None
            check = i == select_at
            seen: dict[str, torch.Tensor] = {}
            attend = self._mixed_attend(i, kv[i], job, active, seen, check, plan)
            hidden, residual = self.m.forward_layer(i, q_pos, hidden, residual, attend)
            if question is not None and i <= self.check_layer:
                question.step(i, kv[i])
            if check:
                picked = self._select(job, spec, kv[i], seen, chunk_of, begins, question, prophet)
                hidden, residual = hidden[picked.to(dev)], residual[picked.to(dev)]
                active, q_pos = picked, None
                if active.numel() == 0:  # nothing picked: the other layers keep the cached KV
                    for j in range(i + 1, self.m.num_layers) if paged else ():
                        self._write(j, kv[j], job)
                    break
        if not paged:  # nothing read the engine's cache meanwhile: every layer at once
            self._write_span(kv[:, :, job.start:], job)
        return active

    def _write(self, i: int, kv_layer: torch.Tensor, job: BlendJob) -> None:
        """Layer i's KV of the span into the engine's cache (kv_layer [2, end, KV, D])."""
        self.m.write_kv(i, kv_layer[0, job.start:], kv_layer[1, job.start:], job.slots)

    def _write_span(self, span: torch.Tensor, job: BlendJob) -> None:
        """Every layer's KV of the span (span [L, 2, end - start, KV, D]) into the engine's cache."""
        write_layers = getattr(self.m, "write_kv_layers", None)
        if write_layers is not None:
            write_layers(span, job.slots)
            return
        for i in range(self.m.num_layers):
            self.m.write_kv(i, span[i, 0], span[i, 1], job.slots)

    def _write_moved(self, span: torch.Tensor, moves, job: BlendJob) -> None:
        """The span's cached KV, keys still at their chunk positions, written with the keys moved
        to their prompt positions: fused where the adapter can, else re-rotated and then written."""
        fused = getattr(self.m, "write_rerotated", None)
        if fused is not None:
            fused(span, moves[0], moves[1], job.slots)
        else:
            self._write_span(self._rotated(span, moves), job)

    def _mixed_attend(self, i: int, kv_layer: torch.Tensor, job: BlendJob, active: torch.Tensor, seen: dict,
                      keep_cached: bool, plan):
        """Attention of the active span tokens against [0, end): fresh KV at their positions,
        cached KV everywhere else. kv_layer [2, end, KV, D] is updated in place; with a paged
        plan it is written to the engine's cache first and the engine's kernel attends."""
        m = self.m
        rows = (active + job.start).to(kv_layer.device)

        def attend(q, k, v):
            k, v = k.view(-1, m.num_kv_heads, m.head_dim), v.view(-1, m.num_kv_heads, m.head_dim)
            if keep_cached:
                seen["k_cached"], seen["v_cached"] = kv_layer[0, rows].clone(), kv_layer[1, rows].clone()
                seen["k"], seen["v"], seen["q"] = k, v, q.view(-1, m.num_heads, m.head_dim)
            kv_layer[0, rows], kv_layer[1, rows] = k, v
            if plan is None:
                return self._attention(q.view(-1, m.num_heads, m.head_dim), kv_layer[0], kv_layer[1], rows)
            self._write(i, kv_layer, job)
            return m.paged_attention(i, q, plan)
        return attend

    class _Question:
        """The question tokens through layers 0..check, attending to the span's KV as it is
        computed; at the check layer, the share of their attention on each cached token."""

        def __init__(self, blender: "Blender", job: BlendJob):
            m = blender.m
            self.b, self.job = blender, job
            tail, at = _question(job)
            self.pos = torch.arange(at, at + len(tail), device=m.device)  # RoPE: its prompt positions
            # the mask: its keys follow the span's end keys, whatever lies between in the prompt
            self.rows = torch.arange(job.end, job.end + len(tail), device=m.device)
            self.hidden = m.embed(torch.tensor(tail, dtype=torch.long, device=m.device))
            self.residual = None
            self.q = self.k = None

        def step(self, i: int, kv_layer: torch.Tensor) -> None:
            m = self.b.m

            def attend(q, k, v):
                k, v = k.view(-1, m.num_kv_heads, m.head_dim), v.view(-1, m.num_kv_heads, m.head_dim)
                self.q, self.k = q.view(-1, m.num_heads, m.head_dim), torch.cat([kv_layer[0], k])
                return self.b._attention(self.q, self.k, torch.cat([kv_layer[1], v]), self.rows)
            self.hidden, self.residual = m.forward_layer(i, self.pos, self.hidden, self.residual, attend)

        def token_relevance(self) -> torch.Tensor:
            """fp32 [span]: the question's mean attention on each span token at the check layer."""
            p = self.b._attention_weights(self.q, self.k, self.rows).mean(dim=(0, 1))  # [keys]
            return p[self.job.start:self.job.end].cpu()

    def _prophet(self, job: BlendJob, kv: torch.Tensor) -> torch.Tensor:
        """fp32 [span]: the question's attention on each span token (kvplug/blend/relevance.py),
        through the chunks' key clusters on long spans that have them."""
        tail, at = _question(job)
        return question_pass(self.m, tail, kv, job.end, job.start, self._span_clusters(job), self.cluster_top, at=at)

    def _span_clusters(self, job: BlendJob):
        if not (self.cluster_min_tokens and job.end - job.start >= self.cluster_min_tokens and job.chunk_clusters):
            return None
        inside = [(b, key) for b, e, key in job.chunks if key is not None and b >= job.start and e <= job.end]
        if not inside or any(key not in job.chunk_clusters for _, key in inside):
            return None
        inv_freq, style = self.m.rope
        return SpanClusters.build([(b, job.chunk_clusters[key]) for b, key in inside], job.end, inv_freq, style)

    def _select(self, job: BlendJob, spec, kv_layer: torch.Tensor | None, seen: dict, chunk_of: torch.Tensor,
                begins: list[int], question: "_Question | None", prophet: torch.Tensor | None) -> torch.Tensor:
        """The span tokens to recompute from here on (sorted), by the policy's parts."""
        if job.ratio >= 1.0:  # every policy: ratio 1 is a full prefill of the span
            return torch.arange(chunk_of.numel())
        n_chunks = len(begins)
        dev = deviation(seen["k"], seen["k_cached"], seen["v"], seen["v_cached"], spec.deviation).cpu() \
            if spec.uses_deviation and seen else None
        rel = prophet if prophet is not None else question.token_relevance() if question is not None else None
        if spec.score == "deviation" or (spec.score == "mix" and rel is None):
            scores = dev
        elif spec.score == "relevance" or dev is None:
            scores = rel if rel is not None else torch.zeros(chunk_of.numel())
        else:
            scores = combine(rel, dev, spec.mix_weight)
        always, offsets = None, None
        if spec.heads and self.head_tokens > 0:
            offsets, first = _chunk_offsets(job, chunk_of, begins)
            always = chunk_heads(offsets, first, self.head_tokens)
        if spec.budget == "adaptive":
            sizes = [int((chunk_of == c).sum()) for c in range(n_chunks)]
            mass = self._outside_mass(job, seen["q"], kv_layer[0], chunk_of, begins)
            relevance = [float(rel[chunk_of == c].sum()) for c in range(n_chunks)] if rel is not None \
                else [1.0] * n_chunks
            return pick_tokens(scores, chunk_of, adaptive_budget(sizes, mass, relevance, job.ratio), always, offsets)
        if spec.budget == "per_chunk":
            return pick_tokens(scores, chunk_of, per_chunk_budget(chunk_of, n_chunks, job.ratio), always, offsets)
        pooled, budget = global_budget(chunk_of, job.ratio)
        return pick_tokens(scores, pooled, budget, always, offsets)

    def _outside_mass(self, job: BlendJob, q: torch.Tensor, keys: torch.Tensor, chunk_of: torch.Tensor,
                      begins: list[int]) -> list[float]:
        """Per cached chunk: the share of its tokens' attention (fresh queries, check layer) that
        goes to positions before the chunk. See selection.py for why this sets the budget."""
        out = []
        for c, begin in enumerate(begins):
            if begin == 0:  # nothing before it: its cached KV is exact
                out.append(0.0)
                continue
            rows = torch.nonzero(chunk_of == c).flatten()[::_MASS_STRIDE]
            pos = (rows + job.start).to(keys.device)
            p = self._attention_weights(q[rows.to(q.device)], keys[:int(pos.max()) + 1], pos)
            out.append(float(p[..., :begin].sum(-1).mean()))
        return out

    def _attention_weights(self, q: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Causal softmax weights [H, T, K] (fp32) of queries q [T, H, D] at q_pos over keys [K, KV, D]."""
        m = self.m
        k = keys.float().repeat_interleave(m.num_heads // m.num_kv_heads, dim=1)
        s = torch.einsum("thd,khd->htk", q.float(), k) * m.scale
        future = torch.arange(k.shape[0], device=s.device)[None, None, :] > q_pos.to(s.device)[None, :, None]
        return s.masked_fill(future, float("-inf")).softmax(-1)

    # ---- chunks --------------------------------------------------------------------------
    def _gather(self, job: BlendJob, report: BlendReport):
        """The span's KV [L, 2, end - start, KV, D] from its chunks, keys still at their positions
        inside their chunks; (old_pos, new_pos) int64 [end - start], where each key is and where it
        goes in the prompt; per span token its cached chunk's index (numbered in order), or -1 when
        it must be recomputed; and where each numbered chunk begins in the prompt."""
        m = self.m
        pieces, old_pos, new_pos, begins = [], [], [], []
        chunk_of = torch.full((job.end - job.start,), -1, dtype=torch.long)
        source = job.chunk_kv if job.chunk_kv is not None else self.store
        for begin, stop, key in job.chunks:
            if begin >= job.end or stop <= job.start:
                continue
            lo, hi = max(begin, job.start), min(stop, job.end)  # the part of the chunk in the span
            kv = source.get(key) if key is not None else None
            if key is not None and (kv is None or kv.shape[2] != stop - begin):
                raise ValueError(f"chunk [{begin}, {stop}) is not cached (or has {None if kv is None else kv.shape[2]} "
                                 f"tokens): only cached chunks are blended")
            if key is None:  # recomputed in the run: a placeholder until then
                kv = torch.zeros((m.num_layers, 2, stop - begin, m.num_kv_heads, m.head_dim), dtype=m.dtype,
                                 device=m.device)
            else:
                report.chunk_hits += 1
                chunk_of[lo - job.start:hi - job.start] = len(begins)
                begins.append(begin)
            pieces.append(kv[:, :, lo - begin:hi - begin].to(m.device))
            old_pos.append(torch.arange(lo - begin, hi - begin))
            new_pos.append(torch.arange(lo, hi))
        span = torch.cat(pieces, dim=2)
        return span, (torch.cat(old_pos).to(span.device), torch.cat(new_pos).to(span.device)), chunk_of, begins

    def _rotated(self, span: torch.Tensor, moves) -> torch.Tensor:
        """span with its keys re-rotated (in place) from old_pos to new_pos."""
        inv_freq, style = self.m.rope
        rerotate_keys(span[:, 0], moves[0], moves[1], inv_freq.to(span.device), style, out=span[:, 0])
        return span

    def _with_prefix(self, job: BlendJob, span: torch.Tensor) -> torch.Tensor:
        """KV for [0, end): what the engine holds for [0, start), then the span."""
        if job.start == 0:
            return span
        slots = job.prefix_slots if job.prefix_slots is not None else torch.arange(job.start)
        return torch.cat([self._read_layers(slots).to(span.device), span], dim=2)

    def _read_layers(self, slots: torch.Tensor) -> torch.Tensor:
        """[L, 2, T, KV, D] at `slots` out of the engine's cache: one read where the adapter can."""
        m = self.m
        read_layers = getattr(m, "read_kv_layers", None)
        if read_layers is not None:
            return read_layers(slots)
        out = torch.empty((m.num_layers, 2, slots.numel(), m.num_kv_heads, m.head_dim), dtype=m.dtype,
                          device=m.device)
        for i in range(m.num_layers):
            out[i, 0], out[i, 1] = m.read_kv(i, slots)
        return out

    # ---- stored form of a chunk ----------------------------------------------------------
    @torch.inference_mode()
    def chunk_payload(self, slots: torch.Tensor, begin: int) -> torch.Tensor:
        """The KV at `slots` (a chunk computed by the engine at positions begin..), keys rotated
        to 0..n-1, as contiguous uint8 bytes of [L, 2, n, KV, D] in the model dtype."""
        m, n = self.m, slots.numel()
        out = self._read_layers(slots)
        inv_freq, style = m.rope
        pos = torch.arange(begin, begin + n, device=out.device)
        rerotate_keys(out[:, 0], pos, pos - begin, inv_freq.to(out.device), style, out=out[:, 0])
        out = out.cpu()
        kv = out.reshape(-1).view(torch.uint8)
        if not self.cluster_tokens:
            return kv
        return torch.cat([kv, kc.pack(kc.cluster_chunk(out, self.cluster_tokens))])

    def chunk_bytes(self, n: int) -> int:
        """Bytes of a stored chunk of n tokens: its KV, then its clusters when they are kept."""
        m = self.m
        side = kc.sidecar_bytes(m.num_layers, m.num_kv_heads, m.head_dim, n, self.cluster_tokens,
                                m.dtype.itemsize) if self.cluster_tokens else 0
        return self._kv_bytes(n) + side

    def chunk_kv(self, payload: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Stored chunk bytes (of n tokens; found from the size when None) viewed as [L, 2, n, KV, D];
        ValueError when the size fits no token count."""
        m = self.m
        n = self._tokens_of(payload.numel()) if n is None else n
        if n <= 0 or self.chunk_bytes(n) != payload.numel():
            raise ValueError(f"{payload.numel()} bytes are not a stored chunk of {n} tokens")
        kv = payload[: self._kv_bytes(n)]
        return kv.view(m.dtype).view(m.num_layers, 2, n, m.num_kv_heads, m.head_dim)

    def chunk_clusters(self, payload: torch.Tensor, n: int):
        """The key clusters stored after a chunk's KV, or None when chunks are stored without."""
        if not self.cluster_tokens:
            return None
        m = self.m
        return kc.unpack(payload[self._kv_bytes(n):], m.num_layers, m.num_kv_heads, m.head_dim, n, self.cluster_tokens, m.dtype)

    def _kv_bytes(self, n: int) -> int:
        """Bytes of n tokens' K and V of every layer, in the model dtype."""
        m = self.m
        return n * 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype.itemsize

    def _tokens_of(self, nbytes: int) -> int:
        n = nbytes // self._kv_bytes(1)
        while n > 0 and self.chunk_bytes(n) > nbytes:  # the sidecar makes a token cost more
            n -= 1
        return n

    @torch.inference_mode()
    def compute_chunk(self, tokens: list[int]) -> torch.Tensor:
        """The chunk's KV with nothing before it, at positions 0..n-1: [L, 2, n, KV, D]."""
        m = self.m
        n = len(tokens)
        out = torch.empty((m.num_layers, 2, n, m.num_kv_heads, m.head_dim), dtype=m.dtype, device=m.device)
        pos = torch.arange(n, device=m.device)
        hidden, residual = m.embed(torch.tensor(tokens, dtype=torch.long, device=m.device)), None
        for i in range(m.num_layers):
            def attend(q, k, v, layer=out[i]):
                layer[0], layer[1] = k.view(n, m.num_kv_heads, m.head_dim), v.view(n, m.num_kv_heads, m.head_dim)
                return self._attention(q.view(n, m.num_heads, m.head_dim), layer[0], layer[1], pos)
            hidden, residual = m.forward_layer(i, pos, hidden, residual, attend)
        return out

    # ---- attention -----------------------------------------------------------------------
    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Causal attention by position: query t sees keys 0..q_pos[t]. q [T, H, D], k/v [K, KV, D]
        -> [T, H*D]. fp32 math (as the engine's kernels accumulate), blocks of queries."""
        m = self.m
        q_pos = q_pos.to(q.device)
        kmax = int(q_pos.max()) + 1
        qf = q.float().transpose(0, 1).unsqueeze(0)
        kf = k[:kmax].float().transpose(0, 1).unsqueeze(0)
        vf = v[:kmax].float().transpose(0, 1).unsqueeze(0)
        out = torch.empty((q.shape[0], m.num_heads, m.head_dim), dtype=q.dtype, device=q.device)
        for i in range(0, q.shape[0], _QUERY_BLOCK):
            qp = q_pos[i:i + _QUERY_BLOCK]
            top = int(qp.max()) + 1
            mask = torch.arange(top, device=q.device)[None, :] <= qp[:, None]
            o = F.scaled_dot_product_attention(qf[:, :, i:i + _QUERY_BLOCK], kf[:, :, :top], vf[:, :, :top],
                                               attn_mask=mask, scale=m.scale, enable_gqa=True)
            out[i:i + _QUERY_BLOCK] = o[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)


def _question(job: BlendJob) -> tuple[list[int], int]:
    """The question tokens the relevance passes run and the position of the first: at most the
    last QUESTION_TOKENS of the tail, so a long question cannot cost a prefill of its own."""
    at = job.end if job.tail_at is None else job.tail_at
    cut = max(0, len(job.tail) - QUESTION_TOKENS)
    return list(job.tail[cut:]), at + cut


def _check_job(job: BlendJob) -> None:
    if not 0 <= job.start < job.end <= len(job.tokens):
        raise ValueError(f"blend span [{job.start}, {job.end}) outside a prompt of {len(job.tokens)} tokens")
    if job.tail_at is not None and job.tail_at < job.end:
        raise ValueError(f"tail_at={job.tail_at}: the question cannot start inside the span [{job.start}, {job.end})")
    if job.slots.numel() != job.end - job.start:
        raise ValueError(f"{job.slots.numel()} slots for a span of {job.end - job.start} tokens")
    if job.policy not in POLICIES:
        raise ValueError(f"recompute_policy={job.policy!r}: allowed values are {', '.join(POLICIES)}")
    if not 0.0 <= job.ratio <= 1.0:
        raise ValueError(f"recompute_ratio={job.ratio!r}: must be in [0, 1]")
    covered = 0
    for begin, stop, _ in job.chunks:
        if begin != covered or stop <= begin:
            raise ValueError(f"chunks must tile the prompt from 0: got {[(b, e) for b, e, _ in job.chunks]}")
        covered = stop
    if covered < job.end:
        raise ValueError(f"chunks end at {covered}, before the span end {job.end}")


def _chunk_offsets(job: BlendJob, chunk_of: torch.Tensor, begins: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per span token of a cached chunk: its offset inside the chunk, and whether the chunk is the
    prompt's first (begins at 0). Tokens of no cached chunk get offset 0 and False (unused)."""
    starts = torch.tensor(begins + [0], dtype=torch.long)[chunk_of]  # index -1 -> the 0 sentinel
    offsets = torch.arange(job.start, job.end) - starts
    return offsets, (starts == 0) & (chunk_of >= 0)
