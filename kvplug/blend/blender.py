"""Blending: the KV of prompt spans built from cached chunks, recomputing only what matters.

    Blender(adapter, check_layer, head_tokens, cluster_tokens, cluster_min_tokens, cluster_top)
    Blender.run(job) -> BlendReport              one job (run_batch of one)
    Blender.check(job)                           ValueError naming what is wrong with a job
    Blender.run_batch(jobs) -> [BlendReport]     every job of a step in one recompute: one pass per
                                                 layer over all jobs' picked tokens
    Blender.stepwise(jobs) -> (steps, reports)   the same, a generator yielding after every layer of
                                                 work, for callers that spread a batch over time
    Blender.read_chunks([(slots, begin)]) -> [kv]   chunks the engine computed, read back from its
                                                 cache with keys rotated to 0..n-1 (what is stored)
    Blender.fmt                                  the stored form of a chunk (chunk_format.py)

How a job is blended (CacheBlend's frame; which tokens are recomputed is the policy's, selection.py):
1. Every cached chunk overlapping [0, end) comes from job.chunk_kv (the worker loaded them); chunks
   with key None (too short to cache, or no tier holds them) are recomputed in every layer. A chunk
   with a key that is not there is an error: the worker hands over what it loaded.
2. Cached keys are re-rotated from their positions inside the chunk to their positions in the
   prompt, so the concatenation is a complete, approximate KV for [0, end).
3. The policy picks the tokens to recompute, within round(ratio x cached tokens): from the
   question's attention over that KV (a pass of the question alone, ProphetKV), and/or from the
   deviation of fresh vs cached KV at the check layer after layers 0..check ran on every span
   token (CacheBlend), plus the chunk heads it always takes (EPIC).
4. The picked tokens run through the layers (all of them, or those after the check layer); their
   fresh KV replaces the cached KV at their positions, everyone else keeps the cached KV. Ratio 0
   runs nothing (the re-rotated concatenation); ratio 1 recomputes every span token in every
   layer (a full prefill of the span).
A batch does every step for all its jobs at once: one question pass over all questions, one
forward_layer call per layer over all jobs' running tokens (each with its own position), attention
per job over its own KV (on the engine's paged kernel: one call for all jobs, each run of tokens a
sequence with its own block table), one cache write for all jobs. A job's result does not depend on
the others in its batch. Writes use the adapter's all-layer methods where it has them (one kernel
launch each on GPU), else write_kv per layer. Positions [0, start) are already in the engine's cache
(its prefix cache, or kvplug's prefix tiers): read back, attended to as they are, never written.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvplug.blend.adapter import ModelAdapter
from kvplug.blend.chunk_format import ChunkFormat
from kvplug.blend.clusters import SpanClusters
from kvplug.blend.layer_kinds import LayerKinds, window_mask
from kvplug.blend.policies import Selection
from kvplug.blend.relevance import QuestionItem, drain, question_logits, question_passes
from kvplug.blend.selection import (POLICIES, adaptive_budget, chunk_heads, combine, deviation, global_budget,
                                   per_chunk_budget, pick_tokens, relevance_budget)

QUESTION_TOKENS = 256  # the relevance passes run at most the question's last 256 tokens
_QUERY_BLOCK = 256  # queries per attention call: bounds the [H, q, k] score matrix
_MASS_STRIDE = 4  # the adaptive estimator samples every 4th token of a chunk


@dataclass
class BlendJob:
    tokens: list[int]  # prompt tokens, at least [0, end)
    start: int  # first position to write: the engine holds [0, start) already
    end: int  # positions [start, end) are written
    chunks: list[tuple[int, int, bytes | None]]  # (begin, stop, key) tiling [0, >= end); key None: recomputed
    slots: torch.Tensor  # int64 [end - start], cache slot of each written position
    ratio: float
    policy: str = "fixed"
    # The request's blocks from position 0: with it (and an adapter that has paged_plan) the
    # engine's attention kernel reads its own cache, which then holds [0, start) and each layer's
    # blended KV before that layer's attention runs.
    block_table: torch.Tensor | None = None
    tail: list[int] = field(default_factory=list)  # the question (relevance)
    tail_at: int | None = None  # position of tail[0] (>= end; None: end, right after the span)
    chunk_kv: Mapping[bytes, torch.Tensor] | None = None  # cached chunks' KV, by key (None: none)
    prefix_slots: torch.Tensor | None = None  # int64 [start]: where the engine holds [0, start); None: slots 0..
    chunk_clusters: Mapping | None = None  # cached chunks' key clusters (kvplug/blend/clusters.py), by key
    audit: bool = False  # also compute the span exactly (scratch memory) and compare the question's logits


@dataclass
class BlendReport:
    tokens: int = 0  # positions written
    recomputed: int = 0  # of which recomputed in the layers after the selection
    chunk_hits: int = 0
    picked: list[int] = field(default_factory=list)  # those positions, as offsets into the span
    # The audit (job.audit and a question): KL(exact || blended) of the next token after the
    # question, in nats, and whether the two distributions' top tokens agree.
    kl: float | None = None
    top1_agree: bool | None = None


@dataclass(eq=False)
class _Work:
    """One job in a batch: its span's KV and which of its tokens run the layers."""
    job: BlendJob
    spec: Selection
    report: BlendReport
    span: torch.Tensor  # [L, 2, n, KV, D], keys at their chunk positions until rotated
    moves: tuple[torch.Tensor, torch.Tensor]  # (old_pos, new_pos) of every span key
    chunk_of: torch.Tensor  # int64 [n]: the cached chunk of each span token, -1 = recomputed
    begins: list[int]  # where each cached chunk begins in the prompt
    kv: torch.Tensor | None = None  # [L, 2, end, KV, D]: the engine's prefix, then the span
    active: torch.Tensor | None = None  # span offsets running the layers now
    select_at: int | None = None  # the layer after which the policy picks (None: picked up front)
    prophet: torch.Tensor | None = None  # the question's attention on each span token
    question: "_Question | None" = None  # the question beside the span up to the check layer
    seen: dict = field(default_factory=dict)  # fresh and cached KV at the check layer

    @property
    def budgeted(self) -> bool:
        return self.job.ratio > 0 and bool((self.chunk_of >= 0).any())

    @property
    def nothing_runs(self) -> bool:
        return not self.budgeted and not bool((self.chunk_of < 0).any())


class Blender:
    def __init__(self, adapter: ModelAdapter, check_layer: int = 1, head_tokens: int = 0,
                 cluster_tokens: int = 0, cluster_min_tokens: int = 0, cluster_top: int = 8):
        """cluster_tokens: tokens per key cluster stored with each chunk (0: none); spans of at
        least cluster_min_tokens (0: never) run the relevance pass through the clusters."""
        self.m = adapter
        self.check_layer = min(max(check_layer, 0), adapter.num_layers - 1)
        self.head_tokens = head_tokens
        self.cluster_tokens, self.cluster_min_tokens, self.cluster_top = cluster_tokens, cluster_min_tokens, cluster_top
        self.fmt = ChunkFormat(adapter.num_layers, adapter.num_kv_heads, adapter.head_dim, adapter.dtype, cluster_tokens)
        self.kinds = LayerKinds.of(adapter)  # each layer's RoPE and sliding window

    # ---- batches ---------------------------------------------------------------------------
    def run(self, job: BlendJob) -> BlendReport:
        return self.run_batch([job])[0]

    @staticmethod
    def check(job: BlendJob) -> None:
        """ValueError naming what is wrong with a job (run_batch checks every job first)."""
        _check_job(job)

    def run_batch(self, jobs: list[BlendJob]) -> list[BlendReport]:
        steps, reports = self.stepwise(jobs)
        drain(steps)
        return reports

    def stepwise(self, jobs: list[BlendJob]):
        """(generator, reports): the batch runs as the generator is advanced, one layer of work per
        step; the reports are complete once it is exhausted. Bad jobs raise ValueError at once."""
        for job in jobs:
            _check_job(job)
        works = [self._gather(job) for job in jobs]
        return self._run(works), [w.report for w in works]

    @torch.inference_mode()
    def _run(self, works: list[_Work]):
        yield from self._blend(works)
        for w in works:
            if w.job.audit:
                yield from self._audit(w)

    def _blend(self, works: list[_Work]):
        moved = [w for w in works if w.nothing_runs]
        if moved:  # nothing runs: the moved concatenation
            self._write_moved(moved)
        works = [w for w in works if not w.nothing_runs]
        if not works:
            return
        for w in works:
            w.kv = self._with_prefix(w.job, self._rotated(w.span, w.moves))
        yield from self._relevance(works)
        for w in works:
            w.select_at = self.check_layer if w.budgeted and w.spec.runs_check_pass else None
            if w.select_at is not None:
                w.active = torch.arange(w.chunk_of.numel())
            elif w.budgeted:
                w.active = self._select(w, None)
            else:
                w.active = torch.nonzero(w.chunk_of < 0).flatten()
        running = [w for w in works if w.active.numel() > 0]
        paged = bool(running) and self._paged(running)
        # With a paged plan the running jobs are written layer by layer (the engine's kernel reads
        # them); the rest, and every job without one, are written once at the end.
        unwritten = [w for w in works if w.active.numel() == 0] if paged else works
        if running:
            yield from self._recompute(running, paged)
        for w in running:
            w.report.recomputed = int(w.active.numel())
            w.report.picked = w.active.tolist()
        if unwritten:
            self._write_spans([w.kv[:, :, w.job.start:] for w in unwritten], [w.job.slots for w in unwritten])

    def _audit(self, w: _Work):
        """The quality guard's sample: the span computed exactly (every token in every layer, into
        a copy of the blended KV, never into the engine's cache), then the question run over both;
        fills w.report.kl (exact || blended, nats) and top1_agree. Needs the adapter's logits."""
        tail, at = _question(w.job)
        if not tail or getattr(self.m, "logits", None) is None:
            return
        blended = w.kv if w.kv is not None else self._with_prefix(w.job, self._rotated(w.span, w.moves))
        n = w.chunk_of.numel()
        exact = _Work(w.job, w.spec, BlendReport(), w.span, w.moves, w.chunk_of, w.begins, kv=blended.clone(),
                      active=torch.arange(n))
        yield from self._recompute([exact], paged=False)
        items = [QuestionItem(tail, at, kv, w.job.end, w.job.start) for kv in (exact.kv, blended)]
        logits = yield from question_logits(self.m, items)
        p, q = logits.log_softmax(-1)
        w.report.kl = float((p.exp() * (p - q)).sum())
        w.report.top1_agree = bool(p.argmax() == q.argmax())

    def _relevance(self, works: list[_Work]):
        """The question's attention over each job's cached KV, for the policies that rank by it."""
        need = [w for w in works if w.budgeted and w.spec.uses_relevance and w.spec.relevance == "prophet"
                and w.job.tail]
        if not need:
            return
        items = []
        for w in need:
            tail, at = _question(w.job)
            items.append(QuestionItem(tail, at, w.kv, w.job.end, w.job.start, self._span_clusters(w.job),
                                      w.spec.relevance_layers))
        results = yield from question_passes(self.m, items, self.cluster_top)
        for w, rel in zip(need, results):
            w.prophet = rel

    def _paged(self, works: list[_Work]) -> bool:
        return getattr(self.m, "paged_plan", None) is not None and all(w.job.block_table is not None for w in works)

    def _recompute(self, works: list[_Work], paged: bool):
        """The active tokens of every job through every layer (at a job's select_at its policy picks
        who goes on), their fresh KV into each job's kv, and with a paged plan into the engine's
        cache layer by layer. Yields after every layer."""
        m, dev = self.m, self.m.device
        ids = torch.cat([torch.tensor(w.job.tokens[w.job.start:w.job.end], dtype=torch.long)[w.active] for w in works])
        hidden, residual, q_pos, plan = m.embed(ids.to(dev)), None, None, None
        for w in works:
            if w.select_at is not None and w.spec.uses_relevance and w.spec.relevance == "check" and w.job.tail:
                w.question = _Question(self, w.job)
        for i in range(m.num_layers):
            if q_pos is None:  # the first layer, and after a selection
                q_pos = torch.cat([w.active + w.job.start for w in works]).to(dev)
                plan = m.paged_plan([(w.active + w.job.start, w.job.block_table) for w in works if w.active.numel()]) \
                    if paged and q_pos.numel() else None
            picking = [w.select_at == i for w in works]
            if q_pos.numel():
                attend = self._batch_attend(i, works, picking, plan)
                hidden, residual = m.forward_layer(i, q_pos, hidden, residual, attend)
            elif paged:  # nothing runs any more: the cache still needs every layer's KV
                self._write_layer(i, works)
            for w in works:
                if w.question is not None and i <= self.check_layer:
                    w.question.step(i, w.kv[i])
            if any(picking):
                hidden, residual = self._pick(i, works, picking, hidden, residual)
                q_pos = None
            yield

    def _pick(self, i: int, works: list[_Work], picking: list[bool], hidden, residual):
        """At layer i the picking jobs keep only their picked tokens: the batch's rows shrink."""
        keep, row = [], 0
        for w, now in zip(works, picking):
            n = w.active.numel()
            if now:
                picked = self._select(w, w.kv[i])
                keep.append(row + picked)
                w.active = picked
            else:
                keep.append(row + torch.arange(n))
            row += n
        rows = torch.cat(keep).to(hidden.device)
        return hidden[rows], residual[rows]

    def _batch_attend(self, i: int, works: list[_Work], picking: list[bool], plan):
        """Attention of every job's active tokens against its own [0, end): fresh KV at their
        positions, cached KV everywhere else. Each job's kv[i] is updated in place; with a paged
        plan every job's layer is written to the engine's cache and its kernel attends for all."""
        m = self.m

        def attend(q, k, v):
            k, v = k.view(-1, m.num_kv_heads, m.head_dim), v.view(-1, m.num_kv_heads, m.head_dim)
            q3 = q.view(-1, m.num_heads, m.head_dim)
            outs, row = [], 0
            for w, now in zip(works, picking):
                n = w.active.numel()
                rows = (w.active + w.job.start).to(k.device)
                layer = w.kv[i]
                if now:
                    w.seen = {"k_cached": layer[0, rows].clone(), "v_cached": layer[1, rows].clone(),
                              "k": k[row:row + n], "v": v[row:row + n], "q": q3[row:row + n]}
                layer[0, rows], layer[1, rows] = k[row:row + n], v[row:row + n]
                if plan is None and n:
                    outs.append(self._attention(q3[row:row + n], layer[0], layer[1], rows, self.kinds.window(i)))
                row += n
            if plan is None:
                return torch.cat(outs)
            self._write_layer(i, works)
            return m.paged_attention(i, q, plan)
        return attend

    # ---- writes into the engine's cache ------------------------------------------------------
    def _write_layer(self, i: int, works: list[_Work]) -> None:
        """Layer i of every job's span into the engine's cache, one write."""
        k = torch.cat([w.kv[i, 0, w.job.start:] for w in works])
        v = torch.cat([w.kv[i, 1, w.job.start:] for w in works])
        self.m.write_kv(i, k, v, torch.cat([w.job.slots for w in works]))

    def _write_spans(self, spans: list[torch.Tensor], slots: list[torch.Tensor]) -> None:
        """Every layer of the spans ([L, 2, T_j, KV, D] each, at slots[j]) into the engine's cache:
        one all-layer write where the adapter has it, else one write per layer."""
        span, slots = torch.cat(spans, dim=2), torch.cat(slots)
        write_layers = getattr(self.m, "write_kv_layers", None)
        if write_layers is not None:
            write_layers(span, slots)
            return
        for i in range(self.m.num_layers):
            self.m.write_kv(i, span[i, 0], span[i, 1], slots)

    def _write_moved(self, works: list[_Work]) -> None:
        """The spans' cached KV, keys still at their chunk positions, written with the keys moved to
        their prompt positions: fused where the adapter can, else re-rotated and then written."""
        fused = getattr(self.m, "write_rerotated", None)
        if fused is None or len(self.kinds.groups) > 1:  # the fused write knows one RoPE
            self._write_spans([self._rotated(w.span, w.moves) for w in works], [w.job.slots for w in works])
            return
        fused(torch.cat([w.span for w in works], dim=2), torch.cat([w.moves[0] for w in works]),
              torch.cat([w.moves[1] for w in works]), torch.cat([w.job.slots for w in works]))

    # ---- selection ---------------------------------------------------------------------------
    def _select(self, w: _Work, kv_layer: torch.Tensor | None) -> torch.Tensor:
        """The span tokens to recompute from here on (sorted), by the policy's parts."""
        job, spec, chunk_of, begins, seen = w.job, w.spec, w.chunk_of, w.begins, w.seen
        if job.ratio >= 1.0:  # every policy: ratio 1 is a full prefill of the span
            return torch.arange(chunk_of.numel())
        # Each tensor-parallel rank scores from its own heads: the scores are summed over ranks first,
        # so every rank picks the same tokens (vLLM's layers all-reduce over the picked tokens).
        dev = self._agree(deviation(seen["k"], seen["k_cached"], seen["v"], seen["v_cached"], spec.deviation)) \
            if spec.uses_deviation and seen else None
        rel = w.prophet if w.prophet is not None else w.question.token_relevance() if w.question is not None else None
        rel = self._agree(rel) if rel is not None else None
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
        groups, budgets = self._budgets(w, rel, always, kv_layer)
        return pick_tokens(scores, groups, budgets, always, offsets)

    def _budgets(self, w: _Work, rel: torch.Tensor | None, always: torch.Tensor | None, kv_layer):
        """(groups, budgets) for pick_tokens: one pooled budget of round(ratio x cached tokens), or the
        policy's split of it over chunks (groups = chunk_of)."""
        job, spec, chunk_of, n_chunks = w.job, w.spec, w.chunk_of, len(w.begins)
        sizes = [int((chunk_of == c).sum()) for c in range(n_chunks)]
        chunk_rel = [float(rel[chunk_of == c].sum()) for c in range(n_chunks)] if rel is not None else [1.0] * n_chunks
        pooled, budget = global_budget(chunk_of, job.ratio)
        if spec.budget == "adaptive":
            mass = self._agree(torch.tensor(self._outside_mass(job, w.seen["q"], kv_layer[0], chunk_of, w.begins,
                                                                self.kinds.window(w.select_at))))
            return chunk_of, adaptive_budget(sizes, mass.tolist(), chunk_rel, job.ratio)
        if spec.budget == "per_chunk":
            return chunk_of, per_chunk_budget(chunk_of, n_chunks, job.ratio)
        if spec.budget == "relevance":
            heads = [int(always[chunk_of == c].sum()) if always is not None else 0 for c in range(n_chunks)]
            if budget[0] > sum(heads):  # else the heads alone exceed it: the pooled pick takes them in order
                return chunk_of, relevance_budget(sizes, chunk_rel, budget[0], heads)
        return pooled, budget

    def _agree(self, scores: torch.Tensor) -> torch.Tensor:
        """fp32 scores summed over tensor-parallel ranks (the adapter's all_reduce), on the host."""
        reduce = getattr(self.m, "all_reduce", None)
        scores = scores.float()
        return (reduce(scores) if reduce is not None else scores).cpu()

    def _outside_mass(self, job: BlendJob, q: torch.Tensor, keys: torch.Tensor, chunk_of: torch.Tensor,
                      begins: list[int], window: int | None) -> list[float]:
        """Per cached chunk: the share of its tokens' attention (fresh queries, check layer) that
        goes to positions before the chunk. See selection.py for why this sets the budget."""
        out = []
        for c, begin in enumerate(begins):
            if begin == 0:  # nothing before it: its cached KV is exact
                out.append(0.0)
                continue
            rows = torch.nonzero(chunk_of == c).flatten()[::_MASS_STRIDE]
            pos = (rows + job.start).to(keys.device)
            p = self._attention_weights(q[rows.to(q.device)], keys[:int(pos.max()) + 1], pos, window)
            out.append(float(p[..., :begin].sum(-1).mean()))
        return out

    def _attention_weights(self, q: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor, window: int | None = None,
                           k_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Causal (windowed) softmax weights [H, T, K] (fp32) of queries q [T, H, D] at q_pos over
        keys [K, KV, D] at k_pos (None: 0..K-1)."""
        m = self.m
        k = keys.float().repeat_interleave(m.num_heads // m.num_kv_heads, dim=1)
        s = torch.einsum("thd,khd->htk", q.float(), k) * m.scale
        k_pos = torch.arange(k.shape[0], device=s.device) if k_pos is None else k_pos.to(s.device)
        seen = window_mask(q_pos.to(s.device), k_pos, window)
        return s.masked_fill(~seen[None], float("-inf")).softmax(-1)

    def _span_clusters(self, job: BlendJob):
        if not (self.cluster_min_tokens and job.end - job.start >= self.cluster_min_tokens and job.chunk_clusters):
            return None
        inside = [(b, key) for b, e, key in job.chunks if key is not None and b >= job.start and e <= job.end]
        if not inside or any(key not in job.chunk_clusters for _, key in inside):
            return None
        return SpanClusters.build([(b, job.chunk_clusters[key]) for b, key in inside], job.end, self.kinds)

    # ---- chunks ------------------------------------------------------------------------------
    def _gather(self, job: BlendJob) -> _Work:
        """The span's KV [L, 2, end - start, KV, D] from its chunks, keys still at their positions
        inside their chunks, with where each key is and goes, each token's cached chunk (-1: to be
        recomputed) and where each cached chunk begins in the prompt."""
        m = self.m
        report = BlendReport(tokens=job.end - job.start)
        pieces, old_pos, new_pos, begins = [], [], [], []
        chunk_of = torch.full((job.end - job.start,), -1, dtype=torch.long)
        source = job.chunk_kv or {}
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
        moves = (torch.cat(old_pos).to(span.device), torch.cat(new_pos).to(span.device))
        return _Work(job, POLICIES[job.policy], report, span, moves, chunk_of, begins)

    def _rotated(self, span: torch.Tensor, moves) -> torch.Tensor:
        """span with its keys re-rotated (in place) from old_pos to new_pos, each layer with its RoPE."""
        self.kinds.rerotate(span[:, 0], moves[0], moves[1])
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

    @torch.inference_mode()
    def read_chunks(self, chunks: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """Chunks the engine computed, (their slots, the position of their first token): one read of
        every layer for all of them, keys rotated to 0..n-1: [L, 2, n, KV, D] each, on the host."""
        if not chunks:
            return []
        slots = torch.cat([s for s, _ in chunks])
        pos = torch.cat([torch.arange(b, b + s.numel()) for s, b in chunks])
        to = torch.cat([torch.arange(s.numel()) for s, _ in chunks])
        out = self._read_layers(slots)
        self.kinds.rerotate(out[:, 0], pos.to(out.device), to.to(out.device))
        return list(out.cpu().split([s.numel() for s, _ in chunks], dim=2))

    # ---- attention ---------------------------------------------------------------------------
    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                   window: int | None = None, k_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention by position: query t sees keys at q_pos[t]-window+1..q_pos[t] (every key
        up to q_pos[t] when window is None). q [T, H, D], k/v [K, KV, D] at positions k_pos (None:
        key j at position j) -> [T, H*D]. fp32 math (as the engine's kernels accumulate), blocks of
        queries, each over the keys its window can reach."""
        m = self.m
        q_pos = q_pos.to(q.device)
        positions = torch.arange(k.shape[0], device=q.device) if k_pos is None else k_pos.to(q.device)
        qf = q.float().transpose(0, 1).unsqueeze(0)
        out = torch.empty((q.shape[0], m.num_heads, m.head_dim), dtype=q.dtype, device=q.device)
        for i in range(0, q.shape[0], _QUERY_BLOCK):
            qp = q_pos[i:i + _QUERY_BLOCK]
            lo, hi = 0, k.shape[0]
            if k_pos is None:  # keys by position: only those the block's queries can reach
                lo, hi = max(0, int(qp.min()) - window + 1) if window else 0, int(qp.max()) + 1
            mask = window_mask(qp, positions[lo:hi], window)
            kf, vf = (t[lo:hi].float().transpose(0, 1).unsqueeze(0) for t in (k, v))
            o = F.scaled_dot_product_attention(qf[:, :, i:i + _QUERY_BLOCK], kf, vf, attn_mask=mask, scale=m.scale,
                                               enable_gqa=True)
            out[i:i + _QUERY_BLOCK] = o[0].transpose(0, 1)
        return out.reshape(q.shape[0], -1)


class _Question:
    """The question tokens through layers 0..check, attending to the span's KV as it is computed;
    at the check layer, the share of their attention on each cached token."""

    def __init__(self, blender: Blender, job: BlendJob):
        m = blender.m
        self.b, self.job = blender, job
        tail, at = _question(job)
        self.pos = torch.arange(at, at + len(tail), device=m.device)  # its prompt positions
        # its keys follow the span's end keys, whatever lies between in the prompt (not run here)
        self.k_pos = torch.cat([torch.arange(job.end, device=m.device), self.pos])
        self.window = blender.kinds.window(min(blender.check_layer, m.num_layers - 1))
        self.hidden = m.embed(torch.tensor(tail, dtype=torch.long, device=m.device))
        self.residual = None
        self.q = self.k = None

    def step(self, i: int, kv_layer: torch.Tensor) -> None:
        m = self.b.m

        def attend(q, k, v):
            k, v = k.view(-1, m.num_kv_heads, m.head_dim), v.view(-1, m.num_kv_heads, m.head_dim)
            self.q, self.k = q.view(-1, m.num_heads, m.head_dim), torch.cat([kv_layer[0], k])
            return self.b._attention(self.q, self.k, torch.cat([kv_layer[1], v]), self.pos, self.b.kinds.window(i),
                                     self.k_pos)
        self.hidden, self.residual = m.forward_layer(i, self.pos, self.hidden, self.residual, attend)

    def token_relevance(self) -> torch.Tensor:
        """fp32 [span]: the question's mean attention on each span token at the check layer."""
        p = self.b._attention_weights(self.q, self.k, self.pos, self.window, self.k_pos).mean(dim=(0, 1))  # [keys]
        return p[self.job.start:self.job.end].cpu()


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
