"""The relevance pass, exact against clustered: how well the clusters find the tokens the question
reads, and what each costs, at 4K and 32K cached tokens (CPU, the default model, bf16).

    python benchmarks/relevance.py [--quick] [--json PATH] [--model PATH] [--sizes 4096,32768]

A span is N / 512 essay passages of 512 tokens, each computed on its own (its cached KV, keys
rotated into the span), and a question in the model's chat template after it. The exact pass
(kvplug/blend/relevance.py) and the clustered one (kvplug/blend/clusters.py: 16 tokens per
cluster, 8 clusters expanded per query head) run the question over that KV. Reported per size:
recall of the exact pass's top 15% and top 1% tokens among the clustered pass's, the L1 distance
of the two relevance distributions, the time of each pass (median of repeats) and their ratio,
and the store-time cost of clustering a 512-token chunk. The blender uses the clustered pass on
spans of at least blend_cluster_min_tokens; this benchmark is where that default comes from.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
CHUNK = 512


def relevance_error(exact, approx, frac: float) -> dict[str, float]:
    """How well approx ranks like exact: recall of exact's top `frac` tokens among approx's, and
    the L1 distance of the two as distributions."""
    k = max(1, round(frac * exact.numel()))
    top_e = set(exact.topk(k).indices.tolist())
    top_a = set(approx.topk(k).indices.tolist())
    l1 = float((exact / exact.sum() - approx / approx.sum().clamp(min=1e-30)).abs().sum())
    return {"recall": len(top_e & top_a) / k, "l1": l1, "k": k, "tokens": exact.numel(),
            "log2_tokens": math.log2(max(exact.numel(), 1))}


def chunk_kv(m, blender, tokens: list[int]):
    """A chunk's KV with nothing before it, at positions 0..n-1 [L, 2, n, KV, D]: the model's layers
    with the blender's attention (what a tier would hold for the chunk)."""
    import torch

    n = len(tokens)
    out = torch.empty((m.num_layers, 2, n, m.num_kv_heads, m.head_dim), dtype=m.dtype, device=m.device)
    pos = torch.arange(n, device=m.device)
    hidden, residual = m.embed(torch.tensor(tokens, dtype=torch.long, device=m.device)), None
    with torch.inference_mode():
        for i in range(m.num_layers):
            def attend(q, k, v, layer=out[i]):
                layer[0], layer[1] = k.view(n, m.num_kv_heads, m.head_dim), v.view(n, m.num_kv_heads, m.head_dim)
                return blender._attention(q.view(n, m.num_heads, m.head_dim), layer[0], layer[1], pos)
            hidden, residual = m.forward_layer(i, pos, hidden, residual, attend)
    return out


def build_span(m, blender, tok, n_tokens: int, corpus_words: list[str]):
    import torch

    pieces, clusters, begin, t_cluster = [], [], 0, []
    words_per_chunk = 380
    for c in range(n_tokens // CHUNK):
        text = " ".join(corpus_words[c * words_per_chunk:(c + 1) * words_per_chunk])
        ids = tok.encode(text, add_special_tokens=False)[:CHUNK]
        kv = chunk_kv(m, blender, ids)
        t = time.perf_counter()
        from kvplug.blend.clusters import cluster_chunk

        clusters.append((begin, cluster_chunk(kv, 16)))
        t_cluster.append(time.perf_counter() - t)
        pos = torch.arange(kv.shape[2])
        blender.kinds.rerotate(kv[:, 0], pos, pos + begin)
        pieces.append(kv)
        begin += kv.shape[2]
    return torch.cat(pieces, 2), clusters, begin, statistics.median(t_cluster)


def measure(m, tok, kv, clusters, end, tail, repeats: int) -> dict:
    from kvplug.blend.clusters import SpanClusters
    from kvplug.blend.layer_kinds import LayerKinds
    from kvplug.blend.relevance import QuestionItem, drain, question_passes

    def question_pass(m, tail, kv, end, start, clusters=None, top=8):
        return drain(question_passes(m, [QuestionItem(tail, end, kv, end, start, clusters)], top))[0]

    kinds = LayerKinds.of(m)

    def timed(fn):
        out, times = None, []
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return out, statistics.median(times)

    exact, t_exact = timed(lambda: question_pass(m, tail, kv, end, 0))
    approx, t_cluster = timed(lambda: question_pass(m, tail, kv, end, 0,
                                                    SpanClusters.build(clusters, end, kinds), top=8))
    e15, e1 = relevance_error(exact, approx, 0.15), relevance_error(exact, approx, 0.01)
    return {"tokens": end, "recall_top15": e15["recall"], "recall_top1": e1["recall"], "l1": e15["l1"],
            "exact_s": t_exact, "clustered_s": t_cluster, "speedup": t_exact / t_cluster}


def main(argv=None) -> int:
    import torch

    with torch.inference_mode():
        return _main(argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4K tokens only, 1 repeat")
    p.add_argument("--sizes", default="4096,32768")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=".data")
    a = p.parse_args(argv)
    import torch
    from models import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from workloads import multidoc_qa as mq
    from workloads.text import load_corpus

    from kvplug.blend.blender import Blender
    from kvplug.blend.hf_adapter import HFModelAdapter

    torch.manual_seed(0)
    sizes = [4096] if a.quick else [int(s) for s in a.sizes.split(",")]
    path = resolve_model(a.model, a.data_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    m = HFModelAdapter(model, 8)  # the blender writes nothing here: no cache needed
    blender = Blender(m)
    words = load_corpus().words
    frame = mq.chat_frame(tok)
    tail = tok.encode(frame.render_tail("What does the author say about startups and growth?"),
                      add_special_tokens=False)
    rows = []
    for n in sizes:
        kv, clusters, end, t_cluster = build_span(m, blender, tok, n, words)
        row = measure(m, tok, kv, clusters, end, tail, 1 if a.quick else 3)
        row["cluster_chunk_s"] = t_cluster
        rows.append(row)
        print(row, flush=True)
    import serving

    serving.print_table(rows, ["tokens", "recall_top15", "recall_top1", "l1", "exact_s", "clustered_s", "speedup",
                               "cluster_chunk_s"])
    out = a.json or RESULTS / ("relevance_quick.json" if a.quick else "relevance.json")
    out.write_text(json.dumps({"benchmark": "relevance", "model": path, "machine": serving.machine_info(),
                               "protocol": {"chunk_tokens": CHUNK, "tokens_per_cluster": 16, "top_clusters": 8,
                                            "dtype": "bfloat16", "question_tokens": len(tail)},
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
