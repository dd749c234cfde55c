"""Blend economics on a GPU: the time to first token of a prompt whose documents are blended from
cached chunks, against a full prefill of the same prompt, on a random-weight model shaped like
Llama-3.1-8B (32 layers, 32 query / 8 KV heads, head dim 128, hidden 4096, MLP 14336, bf16).

    python tools/blend_gpu.py [--dry-run] [--json PATH] [--budget-s S] [--layers N]

A prompt is documents of 4K or 16K tokens in 512-token chunks, then a 32-token question. Each
chunk's KV was computed alone at positions 0..511 (LlamaToy.reference_kv) and is on the GPU, as
the worker holds it after a load (the tier's load time is not counted); with the product's
defaults the 16K span also gets its chunks' key clusters (blend_cluster_min_tokens 16384).
    full prefill   every token of the prompt through the model's layers (tools/blend_check.py's
                   LlamaToy), torch SDPA causal attention in bf16, KV written to the paged cache
    blend r        Blender(...).run(BlendJob(documents, ratio=r, policy "query", tail=question))
                   with the product's default BlendConfig, then the question computed after the
                   blended span (a second run, start = end of the documents, its chunk uncached):
                   what must happen before the first token
TTFT ratio = blend r / full prefill, medians of up to 3 timed runs after a warm-up run. No LM
head on either side (one token's logits, the same work for both), vocabulary trimmed to 32000
(the embedding is a lookup). After the ratio-1 runs the paged cache's document KV is compared
with the full prefill's (relative error per layer, the worst). The JSON (headline
ttft_ratio_<prompt> = {ratio: TTFT ratio}) is rewritten after every measurement; --budget-s
stops starting new ones. Fewer layers than 32 are used when the GPU's free memory says so, and
the output says so. --dry-run: a tiny model on CPU at 64/128-token prompts (what CI runs).

Methods:
    full_prefill(toy, tokens, slots) -> kv      the baseline, [L, 2, T, KV, D]
    EconRun(args).run() -> dict                 every prompt and ratio, the report
    main(argv)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blend_check import BLOCK, LlamaToy, Shape, _rel  # noqa: E402

from kvplug.blend.blender import BlendJob, Blender  # noqa: E402
from kvplug.blend.clusters import cluster_chunk  # noqa: E402
from kvplug.config import BlendConfig  # noqa: E402

LLAMA_8B = Shape(32, 4096, 32, 8, 128, 14336, 32000, ())
TINY = Shape(2, 64, 4, 2, 16, 128, 100, (), 10000.0)
RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
FULL = dict(shape=LLAMA_8B, dtype=torch.bfloat16, prompts=(4096, 16384), chunk=512, question=32, reps=3, warm_up=True)
DRY = dict(shape=TINY, dtype=torch.bfloat16, prompts=(64, 128), chunk=16, question=4, reps=1, warm_up=False)
RESERVE_BYTES = 12 << 30  # activations and workspace of a 16K-token layer, with room
REL_TOL = 5e-2


def _label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _causal_attend(toy: LlamaToy, layer: torch.Tensor, n: int):
    """attend() for a full prefill: keeps K/V in layer [2, n, KV, D]; SDPA causal in the model
    dtype, 4-D [1, H, n, D] with K/V repeated per query head: the shape flash attention takes
    (with 3-D inputs or grouped heads SDPA may fall back to its math kernel, [H, n, n] scores)."""
    H, KV, D = toy.num_heads, toy.num_kv_heads, toy.head_dim

    def attend(q, k, v):
        layer[0], layer[1] = k.view(n, KV, D), v.view(n, KV, D)
        kh = layer[0].repeat_interleave(H // KV, dim=1).transpose(0, 1)[None]
        vh = layer[1].repeat_interleave(H // KV, dim=1).transpose(0, 1)[None]
        qh = q.view(n, H, D).transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=toy.scale)
        return o[0].transpose(0, 1).reshape(n, H * D)
    return attend


@torch.inference_mode()
def full_prefill(toy: LlamaToy, tokens: list[int], slots: torch.Tensor) -> torch.Tensor:
    n = len(tokens)
    kv = torch.empty((toy.num_layers, 2, n, toy.num_kv_heads, toy.head_dim), dtype=toy.dtype, device=toy.device)
    pos = torch.arange(n, device=toy.device)
    hidden, residual = toy.embed(torch.tensor(tokens)), None
    for i in range(toy.num_layers):
        hidden, residual = toy.forward_layer(i, pos, hidden, residual, _causal_attend(toy, kv[i], n))
    toy.write_kv_layers(kv, slots)
    return kv


def _layers_that_fit(shape: Shape, dtype: torch.dtype, tokens: int, dev: torch.device) -> int:
    if dev.type != "cuda":
        return shape.layers
    s, size = shape, dtype.itemsize
    weights = (s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden
               + 3 * s.hidden * s.ffn) * size
    kv = 4 * tokens * 2 * s.kv_heads * s.head_dim * size  # stored chunks, cache, prefill KV, blend span
    free, _ = torch.cuda.mem_get_info(dev)
    return max(1, min(s.layers, int((free - RESERVE_BYTES - s.vocab * s.hidden * 4) // (weights + kv))))


class EconRun:
    def __init__(self, args):
        self.args, self.cfg = args, DRY if args.dry_run else FULL
        self.dev = torch.device("cpu" if args.dry_run else "cuda")
        self.deadline = time.monotonic() + args.budget_s
        shape, dtype = self.cfg["shape"], self.cfg["dtype"]
        longest = max(self.cfg["prompts"]) + self.cfg["question"]
        fit = _layers_that_fit(shape, dtype, longest, self.dev)
        layers = min(args.layers or shape.layers, fit)
        self.shape = replace(shape, layers=layers)
        self.toy = LlamaToy(self.shape, dtype, self.dev, num_blocks=longest // BLOCK + 8)
        blend = BlendConfig()  # the product's defaults
        if args.dry_run:  # tiny chunks: clusters of 4 tokens, the long prompt takes the cluster path
            blend = replace(blend, blend_cluster_tokens=4, blend_cluster_min_tokens=max(self.cfg["prompts"]))
        self.blend = blend
        self.blender = Blender(self.toy, check_layer=blend.blend_check_layer,
                               head_tokens=blend.blend_chunk_head_tokens, cluster_tokens=blend.blend_cluster_tokens,
                               cluster_min_tokens=blend.blend_cluster_min_tokens)
        note = [] if layers == shape.layers else [
            f"{layers} of {shape.layers} layers: " + ("--layers" if args.layers and args.layers < fit else
                                                      "the GPU's free memory fits no more")]
        self.report = dict(mode="dry-run" if args.dry_run else "full", device=self._device_name(),
                           torch=torch.__version__, setup=self._setup(layers), prompts=[], results=[],
                           headline={}, not_run=[], notes=note)

    def _device_name(self) -> str:
        return torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"

    def _setup(self, layers: int) -> dict:
        c, b = self.cfg, self.blend
        return dict(model=f"random-weight {'tiny Llama' if self.args.dry_run else 'Llama-3.1-8B'} shape",
                    **{k: v for k, v in asdict(self.shape).items() if k != "chunks"}, layers_used=layers,
                    dtype=str(c["dtype"]).removeprefix("torch."), chunk_tokens=c["chunk"],
                    question_tokens=c["question"],
                    policy=b.recompute_policy, check_layer=b.blend_check_layer, head_tokens=b.blend_chunk_head_tokens,
                    cluster_tokens=b.blend_cluster_tokens, cluster_min_tokens=b.blend_cluster_min_tokens,
                    ratios=list(RATIOS), max_timed_runs=c["reps"], warm_up_run=c["warm_up"],
                    kv_rel_error_expected_below=REL_TOL,
                    full_prefill="LlamaToy layers, SDPA is_causal in the model dtype, one write_kv_layers",
                    blend="Blender.run(documents, tail=question) + Blender.run(question after them)",
                    chunk_kv="on the GPU before the clock starts (no tier load counted)")

    # ---- measuring ------------------------------------------------------------------------
    def _write(self) -> None:
        if self.args.json:
            path = Path(self.args.json)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(self.report, indent=1, default=str))
            tmp.replace(path)

    def _timed(self, fn) -> float:
        _sync(self.dev)
        start = time.perf_counter()
        fn()
        _sync(self.dev)
        return time.perf_counter() - start

    def _measure(self, fn) -> list[float] | None:
        """A warm-up run (not in the dry run: its times mean nothing), then up to reps timed runs
        while the budget allows; None when the budget was spent before it started."""
        if time.monotonic() > self.deadline:
            return None
        if not self.cfg["warm_up"]:
            return [self._timed(fn) for _ in range(self.cfg["reps"])]
        warm = self._timed(fn)
        left = self.deadline - time.monotonic()
        reps = max(1, min(self.cfg["reps"], int(left / max(warm, 1e-3))))
        return [self._timed(fn) for _ in range(reps)]

    def _prompt(self, n_docs: int, seed: int):
        c = self.cfg
        g = torch.Generator().manual_seed(seed)
        n = n_docs + c["question"]
        tokens = torch.randint(0, self.shape.vocab, (n,), generator=g).tolist()
        blocks = torch.randperm(self.toy.num_blocks, generator=g)[:(n + BLOCK - 1) // BLOCK]
        pos = torch.arange(n)
        slots = (blocks[pos // BLOCK] * BLOCK + pos % BLOCK).to(self.dev)
        chunks = [(b, b + c["chunk"], f"doc{seed}-{b}".encode()) for b in range(0, n_docs, c["chunk"])]
        return tokens, slots, chunks

    def _chunk_store(self, tokens, chunks, n_docs: int):
        kv, clusters = {}, {}
        clustered = self.blend.blend_cluster_tokens and n_docs >= self.blend.blend_cluster_min_tokens
        for b, e, key in chunks:
            kv[key] = self.toy.reference_kv(tokens[b:e])
            if clustered:
                clusters[key] = cluster_chunk(kv[key], self.blend.blend_cluster_tokens)
        return kv, (clusters or None)

    def _jobs(self, tokens, slots, chunks, n_docs, kv, clusters, ratio):
        q = self.cfg["question"]
        docs = BlendJob(tokens=tokens, start=0, end=n_docs, chunks=chunks, slots=slots[:n_docs], ratio=ratio,
                        policy=self.blend.recompute_policy, tail=tokens[n_docs:], chunk_kv=kv, chunk_clusters=clusters)
        question = BlendJob(tokens=tokens, start=n_docs, end=n_docs + q, chunks=chunks + [(n_docs, n_docs + q, None)],
                            slots=slots[n_docs:], ratio=ratio, policy=self.blend.recompute_policy, chunk_kv=kv,
                            prefix_slots=slots[:n_docs])
        return docs, question

    def _blend_once(self, docs, question, out: dict) -> None:
        _sync(self.dev)
        t0 = time.perf_counter()
        report = self.blender.run(docs)
        _sync(self.dev)
        t1 = time.perf_counter()
        self.blender.run(question)
        _sync(self.dev)
        out.setdefault("blend_s", []).append(t1 - t0)
        out.setdefault("question_s", []).append(time.perf_counter() - t1)
        out["recomputed"] = report.recomputed

    def _one_ratio(self, label, ratio, full_s, setup, full_kv) -> None:
        tokens, slots, chunks, n_docs, kv, clusters = setup
        row = dict(prompt=label, tokens=len(tokens), ratio=ratio)
        docs, question = self._jobs(tokens, slots, chunks, n_docs, kv, clusters, ratio)
        parts: dict = {}
        try:
            runs = self._measure(lambda: self._blend_once(docs, question, parts))
            if runs is not None and ratio >= 1.0:  # every document token recomputed: the full prefill's KV
                row["kv_rel_error_vs_full"] = _rel(self.toy.paged.read(slots[:n_docs]), full_kv[:, :, :n_docs])
        except Exception as exc:  # noqa: BLE001 - one ratio failing is reported, the others run
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            self.report["results"].append(row)
            print(f"{label:>5} ratio {ratio:<5} ERROR {row['error']}", flush=True)
            return
        if runs is None:
            self.report["not_run"].append(f"{label} ratio {ratio}: --budget-s spent")
            return
        skip = len(parts["blend_s"]) - len(runs)  # the warm-up's own parts
        row.update(ttft_s=statistics.median(runs), runs_s=runs, blend_s=statistics.median(parts["blend_s"][skip:]),
                   question_s=statistics.median(parts["question_s"][skip:]), recomputed=parts["recomputed"])
        row["ttft_ratio"] = row["ttft_s"] / full_s
        self.report["results"].append(row)
        self.report["headline"].setdefault(f"ttft_ratio_{label}", {})[str(ratio)] = round(row["ttft_ratio"], 4)
        print(f"{label:>5} ratio {ratio:<5} TTFT {row['ttft_s'] * 1e3:9.1f} ms = {row['ttft_ratio']:6.3f}x full "
              f"(blend {row['blend_s'] * 1e3:.1f} + question {row['question_s'] * 1e3:.1f} ms, "
              f"{row['recomputed']} recomputed)", flush=True)

    def _one_prompt(self, n_docs: int, seed: int) -> None:
        label = _label(n_docs)
        tokens, slots, chunks = self._prompt(n_docs, seed)
        kept: dict = {}
        try:
            full = self._measure(lambda: kept.update(kv=full_prefill(self.toy, tokens, slots)))
            store = self._chunk_store(tokens, chunks, n_docs) if full is not None else None
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 16K: the smaller prompt's rows stand
            self.report["results"].append(dict(prompt=label, tokens=len(tokens), ratio=None,
                                               error=f"full prefill / chunk KV: {type(exc).__name__}: {exc}"[:300]))
            print(f"{label:>5} ERROR {self.report['results'][-1]['error']}", flush=True)
            return
        if full is None:
            self.report["not_run"] += [f"{label} full prefill and every ratio: --budget-s spent"]
            return
        full_s = statistics.median(full)
        self.report["prompts"].append(dict(prompt=label, tokens=len(tokens), documents=n_docs, chunks=len(chunks),
                                           full_prefill_s=full_s, full_runs_s=full))
        self.report["headline"][f"full_prefill_s_{label}"] = round(full_s, 5)
        print(f"{label:>5} full prefill of {len(tokens)} tokens: {full_s * 1e3:.1f} ms", flush=True)
        kv, clusters = store
        self.report["prompts"][-1]["clusters"] = clusters is not None
        self._write()
        for ratio in RATIOS:
            self._one_ratio(label, ratio, full_s, (tokens, slots, chunks, n_docs, kv, clusters), kept["kv"])
            self._write()

    def run(self) -> dict:
        s = self.report["setup"]
        print(f"blend economics on {self.report['device']}: {s['model']}, {s['layers_used']} layers, {s['dtype']}, "
              f"policy {s['policy']}", flush=True)
        for n in self.report["notes"]:
            print("note:", n, flush=True)
        self._write()
        for i, n_docs in enumerate(self.cfg["prompts"]):
            self._one_prompt(n_docs, seed=i + 1)
        self._write()
        return self.report


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU (CI)")
    p.add_argument("--json", help="write the report there (rewritten after every measurement)")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no measurement after this many seconds")
    p.add_argument("--layers", type=int, help="use fewer layers than the model shape has")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run")
    try:
        econ = EconRun(args)
    except Exception as exc:  # noqa: BLE001 - say in the file why nothing was measured (e.g. out of memory)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(error=f"setup: {type(exc).__name__}: {exc}"[:500], results=[],
                                                       headline={}, not_run=["everything"])))
        raise
    report = econ.run()
    return 1 if any(r.get("error") for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
