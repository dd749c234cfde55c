"""Blending: the KV of a prompt span built from cached chunks, recomputing only what matters.

    Blender(adapter, store, check_layer)
    Blender.run(job) -> BlendReport          fill the engine's cache for positions [job.start, job.end)
    Blender.compute_chunk(tokens) -> kv      a chunk's own KV [L, 2, n, KV, D] at positions 0..n-1

How `run` works (CacheBlend, with Cache-Craft's per-chunk budget as the adaptive policy):
1. Every chunk overlapping [0, end) is fetched from the store. A missed chunk's tokens are
   recomputed in every layer; when the run ends, their KV, keys rotated back to the chunk's own
   positions 0..n-1, is stored for next time. (CacheBlend prefills each chunk alone first; the
   KV of the chunk's first context costs no extra pass, and selective recompute corrects it the
   same way when the chunk comes back elsewhere.) A missed chunk that starts before the span
   (the engine already holds its start) is prefilled alone (compute_chunk) instead.
2. Cached keys are re-rotated from their positions inside the chunk to their positions in the
   prompt, so the concatenation is a complete, approximate KV for [0, end).
3. With ratio > 0, layers 0..check run on every span token against that KV (fresh KV replaces
   cached KV as it is computed), and the per-token deviation between fresh and cached K and V
   at the check layer picks the tokens to keep recomputing (kvplug/blend/selection.py).
4. Later layers run on the picked tokens only; their fresh KV replaces the cached KV at their
   positions, everyone else keeps the cached KV. With ratio 0 and every chunk cached nothing
   runs: the cache gets the re-rotated concatenation. With ratio 1 every span token is
   recomputed in every layer: a full prefill of the span.
Positions [0, start) are already in the engine's cache (its prefix cache); they are attended
to with their cached-chunk KV here, and never written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvplug.blend.adapter import ModelAdapter
from kvplug.blend.selection import adaptive_budget, fixed_budget, pick_tokens
from kvplug.config import RECOMPUTE_POLICIES
from kvplug.ops.deviation_topk import deviation_topk
from kvplug.ops.rope import rerotate_keys

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
    tail: list[int] = field(default_factory=list)  # the question after the span (adaptive: relevance)


@dataclass
class BlendReport:
    tokens: int = 0  # positions written
    recomputed: int = 0  # of which recomputed in the layers after the check layer
    chunk_hits: int = 0
    chunk_misses: int = 0


class Blender:
    def __init__(self, adapter: ModelAdapter, store, check_layer: int = 1):
        self.m, self.store = adapter, store
        self.check_layer = min(max(check_layer, 0), adapter.num_layers - 1)

    # ---- one request ---------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, job: BlendJob) -> BlendReport:
        _check_job(job)
        report = BlendReport(tokens=job.end - job.start)
        kv, chunk_of, begins, fill = self._gather(job, report)
        n = job.end - job.start
        score = job.ratio > 0 and bool((chunk_of >= 0).any())
        active = torch.arange(n) if score else torch.nonzero(chunk_of < 0).flatten()
        if active.numel() == 0:
            for i in range(self.m.num_layers):
                self._write(i, kv[i], job)
            return report
        dev = self.m.device
        ids = torch.tensor(job.tokens[job.start:job.end], dtype=torch.long, device=dev)
        positions = torch.arange(job.start, job.end, device=dev)
        paged = job.block_table is not None and getattr(self.m, "paged_plan", None) is not None
        hidden, residual = self.m.embed(ids[active.to(dev)]), None
        q_pos = None
        # Adaptive: the question runs beside the span up to the check layer (never written) so
        # its attention can say which chunks it reads.
        question = self._Question(self, job) if score and job.policy == "adaptive" and job.tail else None
        for i in range(self.m.num_layers):
            if q_pos is None:  # the first layer, and after the selection
                q_pos = positions[active.to(dev)]
                plan = self.m.paged_plan(q_pos, job.block_table) if paged else None
            check = score and i == self.check_layer
            seen: dict[str, torch.Tensor] = {}
            attend = self._mixed_attend(i, kv[i], job, active, seen, check, plan)
            hidden, residual = self.m.forward_layer(i, q_pos, hidden, residual, attend)
            if plan is None:
                self._write(i, kv[i], job)
            if question is not None and i <= self.check_layer:
                question.step(i, kv[i])
            if check:
                picked = self._select(job, kv[i], seen, chunk_of, begins, question)
                hidden, residual = hidden[picked.to(dev)], residual[picked.to(dev)]
                active, q_pos = picked, None
                if active.numel() == 0:  # nothing picked: the other layers keep the cached KV
                    for j in range(i + 1, self.m.num_layers):
                        self._write(j, kv[j], job)
                    break
        report.recomputed = int(active.numel())
        self._store_recomputed(kv, fill)
        return report

    def _write(self, i: int, kv_layer: torch.Tensor, job: BlendJob) -> None:
        """Layer i's KV of the span into the engine's cache."""
        self.m.write_kv(i, kv_layer[0, job.start:], kv_layer[1, job.start:], job.slots)

    def _store_recomputed(self, kv: torch.Tensor, fill: list[tuple[int, int, bytes]]) -> None:
        """Store missed chunks from the KV just computed for them, keys back at 0..n-1."""
        inv_freq, style = self.m.rope
        for begin, stop, key in fill:
            chunk = kv[:, :, begin:stop].clone()
            pos = torch.arange(begin, stop, device=kv.device)
            rerotate_keys(chunk[:, 0], pos, pos - begin, inv_freq.to(kv.device), style, out=chunk[:, 0])
            self.store.put(key, chunk)

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
        computed; at the check layer, the share of their attention on each cached chunk."""

        def __init__(self, blender: "Blender", job: BlendJob):
            m = blender.m
            self.b, self.job = blender, job
            self.pos = torch.arange(job.end, job.end + len(job.tail), device=m.device)
            self.hidden = m.embed(torch.tensor(job.tail, dtype=torch.long, device=m.device))
            self.residual = None
            self.q = self.k = None

        def step(self, i: int, kv_layer: torch.Tensor) -> None:
            m = self.b.m

            def attend(q, k, v):
                k, v = k.view(-1, m.num_kv_heads, m.head_dim), v.view(-1, m.num_kv_heads, m.head_dim)
                self.q, self.k = q.view(-1, m.num_heads, m.head_dim), torch.cat([kv_layer[0], k])
                return self.b._attention(self.q, self.k, torch.cat([kv_layer[1], v]), self.pos)
            self.hidden, self.residual = m.forward_layer(i, self.pos, self.hidden, self.residual, attend)

        def shares(self, chunk_of: torch.Tensor, n_chunks: int) -> list[float]:
            p = self.b._attention_weights(self.q, self.k, self.pos).mean(dim=(0, 1))  # [keys]
            span = p[self.job.start:self.job.end].cpu()
            return [float(span[chunk_of == c].sum()) for c in range(n_chunks)]

    def _select(self, job: BlendJob, kv_layer: torch.Tensor, seen: dict, chunk_of: torch.Tensor,
                begins: list[int], question: "_Question | None" = None) -> torch.Tensor:
        scores, _ = deviation_topk(seen["k"], seen["k_cached"], 0, seen["v"], seen["v_cached"])
        scores = scores.cpu()
        if job.policy == "adaptive":
            sizes = [int((chunk_of == c).sum()) for c in range(len(begins))]
            mass = self._outside_mass(job, seen["q"], kv_layer[0], chunk_of, begins)
            relevance = question.shares(chunk_of, len(begins)) if question is not None else [1.0] * len(begins)
            return pick_tokens(scores, chunk_of, adaptive_budget(sizes, mass, relevance, job.ratio))
        pooled, budget = fixed_budget(chunk_of, job.ratio)
        return pick_tokens(scores, pooled, budget)

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
    def _gather(self, job: BlendJob, report: BlendReport) -> tuple[torch.Tensor, torch.Tensor, list[int], list]:
        """KV for [0, end) from the chunks, keys rotated to their prompt positions; per span
        token its cached chunk's index (numbered in order), or -1 when it must be recomputed;
        where each numbered chunk begins in the prompt; and the missed chunks to store once the
        run has computed them."""
        m = self.m
        pieces, old_pos, new_pos, fill, begins = [], [], [], [], []
        chunk_of = torch.full((job.end - job.start,), -1, dtype=torch.long)
        for begin, stop, key in job.chunks:
            if begin >= job.end:
                break
            kv = self.store.get(key) if key is not None else None
            hit = kv is not None and kv.shape[2] == stop - begin
            if key is not None:
                report.chunk_hits += hit
                report.chunk_misses += not hit
            used = min(stop, job.end) - begin
            if not hit and begin >= job.start:  # recomputed in the run: a placeholder until then
                kv = torch.zeros((m.num_layers, 2, used, m.num_kv_heads, m.head_dim), dtype=m.dtype, device=m.device)
                if key is not None and stop <= job.end:
                    fill.append((begin, stop, key))
            elif not hit:
                kv = self.compute_chunk(job.tokens[begin:stop])
                if key is not None:
                    self.store.put(key, kv)
            pieces.append(kv[:, :, :used].to(m.device))
            old_pos.append(torch.arange(used))
            new_pos.append(torch.arange(begin, begin + used))
            lo, hi = max(begin, job.start) - job.start, min(stop, job.end) - job.start
            if hit and hi > lo:
                chunk_of[lo:hi] = len(begins)
                begins.append(begin)
        kv = torch.cat(pieces, dim=2)
        inv_freq, style = self.m.rope
        dev = kv.device
        rerotate_keys(kv[:, 0], torch.cat(old_pos).to(dev), torch.cat(new_pos).to(dev), inv_freq.to(dev), style,
                      out=kv[:, 0])
        return kv, chunk_of, begins, fill

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


def _check_job(job: BlendJob) -> None:
    if not 0 <= job.start < job.end <= len(job.tokens):
        raise ValueError(f"blend span [{job.start}, {job.end}) outside a prompt of {len(job.tokens)} tokens")
    if job.slots.numel() != job.end - job.start:
        raise ValueError(f"{job.slots.numel()} slots for a span of {job.end - job.start} tokens")
    if job.policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute_policy={job.policy!r}: allowed values are {', '.join(RECOMPUTE_POLICIES)}")
    if not 0.0 <= job.ratio <= 1.0:
        raise ValueError(f"recompute_ratio={job.ratio!r}: must be in [0, 1]")
    covered = 0
    for begin, stop, _ in job.chunks:
        if begin != covered or stop <= begin:
            raise ValueError(f"chunks must tile the prompt from 0: got {[(b, e) for b, e, _ in job.chunks]}")
        covered = stop
    if covered < job.end:
        raise ValueError(f"chunks end at {covered}, before the span end {job.end}")
