"""The blender on a random-weight Llama-shaped model (torch only, no vLLM, no transformers), its
writes into a vLLM 0.32 paged cache (LBNHC) read back and compared with a reference forward. The
model's KV access is the worker's canonical path (kvplug/blend/paged_cache.py): the blender writes
every layer in one launch (write_kv_layers), ratio 0 through the fused write_rerotated, reads
through read_kv_layers.

    python tools/blend_check.py [--device cuda|cpu] [--dtype bfloat16] [--shape llama-1b|tiny] [--json PATH]

Checks (the blender through its public API only: Blender(adapter, check_layer=...),
BlendJob(...), Blender.run; the adapter follows kvplug/blend/adapter.py):
    ratio_1     ratio 1.0, every chunk cached: a full prefill of the span; the cache must hold
                the reference forward's KV (explicit-softmax causal attention) within the dtype's
                tolerance, as a relative error per layer
    ratio_0     ratio 0.0: the cache must hold the cached chunks' KV, keys re-rotated to their
                prompt positions (rerotate_keys_ref), concatenated
    fused       the same concatenation written by PagedKV.write_rerotated (one fused
                rerotate_and_scatter over every layer), directly
    per_layer   ratio 0 and 1 through those all-layer methods equal the same blends written layer by
                layer with write_kv (the path of adapters without them), within the dtype's tolerance
    partial     ratio 0.15 runs and recomputes some tokens (a smoke run, no tolerance)

Methods:
    LlamaToy(shape, dtype, device, seed)   a ModelAdapter over random Llama weights and a paged cache
    LlamaToy.twin(wired)                   the same weights over a cache of its own
    run_checks(shape, dtype, device) -> list[dict]   one dict per check: name, ok, error, tol, seconds
    main(argv)                              prints one line per check; exit 1 if any fails
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvplug.blend.blender import BlendJob, Blender
from kvplug.blend.paged_cache import OPTIONAL, PagedCacheKV
from kvplug.ops.kv_layout import make_vllm_caches, vllm_kv_views
from kvplug.ops.paged_kv import PagedKV
from kvplug.ops.rope import rerotate_keys_ref, rope_inv_freq


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    chunks: tuple[int, ...]  # chunk lengths of the prompt
    theta: float = 500000.0


# Llama-3.2-1B's shapes (vocabulary trimmed: the embedding is not what is checked).
SHAPES = {"llama-1b": Shape(16, 2048, 32, 8, 64, 8192, 32000, (384, 512, 640, 512)),
          "tiny": Shape(3, 64, 4, 2, 16, 128, 100, (7, 20, 25, 18), 10000.0)}
# Relative error (Frobenius, per layer) allowed for ratio 1: only attention differs from the
# reference (SDPA in blocks vs one explicit softmax), then its output rounding travels on
# through the later layers. ratio 0 / fused compare rounded re-rotations: per element.
REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ELEM_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BLOCK = 16


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


class LlamaToy:
    """Random-weight Llama decoder as a ModelAdapter: vLLM's layer convention (positions, hidden,
    residual) -> (hidden, residual), neox RoPE, grouped KV heads, SwiGLU; write_kv scatters into
    a vLLM 0.32 LBNHC paged cache through PagedKV, and (wired) the all-layer methods are bound."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device, seed: int = 0, num_blocks: int = 0):
        s = self.shape = shape
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = s.layers, s.heads, s.kv_heads, s.head_dim
        self.dtype, self.device, self.scale = dtype, torch.device(device), s.head_dim ** -0.5
        g = torch.Generator(device=self.device).manual_seed(seed)

        def w(*dims):  # std 1/sqrt(fan_in): activations stay O(1) through the layers
            return (torch.randn(*dims, generator=g, device=self.device) / math.sqrt(dims[0])).to(dtype)
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
        self.emb = torch.randn(s.vocab, s.hidden, generator=g, device=self.device).to(dtype)
        self.w = [dict(qkv=w(s.hidden, qkv), o=w(s.heads * s.head_dim, s.hidden), up=w(s.hidden, 2 * s.ffn),
                       down=w(s.ffn, s.hidden), n1=torch.ones(s.hidden, dtype=dtype, device=self.device),
                       n2=torch.ones(s.hidden, dtype=dtype, device=self.device)) for _ in range(s.layers)]
        self.inv_freq = rope_inv_freq(s.head_dim, s.theta)
        self.num_blocks = num_blocks or sum(s.chunks) // BLOCK + 4
        self.paged_plan = None  # the blender attends with torch SDPA over its own KV copy
        self._attach(wired=True)

    def _attach(self, wired: bool) -> None:
        s = self.shape
        self.caches = make_vllm_caches(s.layers, self.num_blocks, BLOCK, s.kv_heads, s.head_dim, self.dtype,
                                       self.device, "LBNHC")
        self.paged = PagedKV(self.caches, "LBNHC")
        if wired:
            PagedCacheKV(self.caches, self.rope, "LBNHC").bind(self)

    def twin(self, wired: bool) -> "LlamaToy":
        other = copy.copy(self)  # shares the weights
        for name in OPTIONAL:
            other.__dict__.pop(name, None)
        other._attach(wired)
        return other

    @property
    def rope(self):
        return self.inv_freq, "neox"

    def embed(self, ids):
        return self.emb[ids.to(self.device)]

    def _rotate(self, x, pos):
        inv = self.inv_freq.to(x.device)
        return rerotate_keys_ref(x, torch.zeros_like(pos), pos, inv, "neox")

    def forward_layer(self, i, positions, hidden, residual, attend):
        s, w = self.shape, self.w[i]
        residual = hidden if residual is None else hidden + residual
        x = _rms(residual, w["n1"]) @ w["qkv"]
        q, k, v = x.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        pos = positions.to(self.device)
        q = self._rotate(q.reshape(-1, s.heads, s.head_dim), pos).reshape(q.shape)
        k = self._rotate(k.reshape(-1, s.kv_heads, s.head_dim), pos).reshape(k.shape)
        residual = attend(q, k, v) @ w["o"] + residual
        gate, up = (_rms(residual, w["n2"]) @ w["up"]).chunk(2, -1)
        return (torch.nn.functional.silu(gate) * up) @ w["down"], residual

    def write_kv(self, i, k, v, slots):
        self.paged.write(torch.stack([k, v])[None], slots, first_layer=i)

    def paged_attention(self, i, q, plan):  # never called: paged_plan is None
        raise NotImplementedError

    def reference_kv(self, tokens: list[int]) -> torch.Tensor:
        """Plain full prefill from position 0 with an explicit causal softmax: [L, 2, T, KV, D]."""
        s, n = self.shape, len(tokens)
        pos = torch.arange(n, device=self.device)
        out = []

        def attend(q, k, v):
            qh = q.view(n, s.heads, s.head_dim).float()
            kh = k.view(n, s.kv_heads, s.head_dim).float().repeat_interleave(s.heads // s.kv_heads, 1)
            vh = v.view(n, s.kv_heads, s.head_dim).float().repeat_interleave(s.heads // s.kv_heads, 1)
            out.append(torch.stack([k.view(n, s.kv_heads, s.head_dim), v.view(n, s.kv_heads, s.head_dim)]))
            scores = torch.einsum("qhd,khd->hqk", qh, kh) * self.scale
            causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            return torch.einsum("hqk,khd->qhd", p, vh).reshape(n, -1).to(q.dtype)
        hidden, residual = self.embed(torch.tensor(tokens)), None
        for i in range(s.layers):
            hidden, residual = self.forward_layer(i, pos, hidden, residual, attend)
        return torch.stack(out)


class DictStore:
    def __init__(self):
        self.d = {}

    def get(self, key):
        return self.d.get(key)

    def put(self, key, kv):
        self.d[key] = kv.clone()


def _prompt(toy: LlamaToy, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = sum(toy.shape.chunks)
    tokens = torch.randint(0, toy.shape.vocab, (n + 8,), generator=g).tolist()
    chunks, at = [], 0
    for i, size in enumerate(toy.shape.chunks):
        chunks.append((at, at + size, bytes([i + 1]) * 32))
        at += size
    nb = toy.caches[0].shape[0]
    blocks = torch.randperm(nb, generator=g)[:(n + BLOCK - 1) // BLOCK]  # the request's block table
    pos = torch.arange(n)
    return tokens, chunks, n, blocks[pos // BLOCK] * BLOCK + pos % BLOCK


def _policy() -> str:
    from kvplug.config import RECOMPUTE_POLICIES
    return "fixed" if "fixed" in RECOMPUTE_POLICIES else RECOMPUTE_POLICIES[0]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Worst layer's ||got - want|| / ||want||."""
    d = (got.float() - want.float()).flatten(1).norm(dim=1) / want.float().flatten(1).norm(dim=1).clamp_min(1e-30)
    return float(d.max())


def _elem(got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """max |got - want| / (tol + tol |want|): <= 1 passes, as torch.testing.assert_close."""
    g, w = got.float(), want.float()
    return float(((g - w).abs() / (tol + tol * w.abs())).max())


def _concat(toy, cached, chunks, end):
    pieces = []
    for b, e, key in chunks:
        kv = cached[key].clone()
        kv[:, 0] = rerotate_keys_ref(kv[:, 0], torch.arange(e - b, device=kv.device),
                                     torch.arange(b, e, device=kv.device), toy.inv_freq.to(kv.device), "neox")
        pieces.append(kv)
    return torch.cat(pieces, 2)[:, :, :end]


def _check(name, fn, tol, results):
    start = time.perf_counter()
    try:
        error = fn()
        ok = error <= tol
        results.append(dict(name=name, ok=ok, error=error, tol=tol))
    except Exception as exc:  # noqa: BLE001 - a check that crashes is reported, the others still run
        results.append(dict(name=name, ok=False, error=None, tol=tol, crash=f"{type(exc).__name__}: {exc}"[:300]))
    results[-1]["seconds"] = round(time.perf_counter() - start, 3)


def _per_layer(toy: LlamaToy, blender: Blender, job, slots: torch.Tensor, dtype: torch.dtype) -> float:
    """Ratio 0 and 1 written through the all-layer methods against the same blends written layer
    by layer (a twin of the toy without them, same weights and chunks): worst _elem."""
    plain = toy.twin(wired=False)
    other, worst = Blender(plain, check_layer=blender.check_layer), 0.0
    for r in (0.0, 1.0):
        blender.run(job(r))
        other.run(job(r))
        worst = max(worst, _elem(toy.paged.read(slots), plain.paged.read(slots), ELEM_TOL[dtype]))
    return worst


def run_checks(shape: Shape, dtype: torch.dtype, device) -> list[dict]:
    toy = LlamaToy(shape, dtype, device)
    tokens, chunks, end, slots = _prompt(toy)
    store = DictStore()
    for b, e, key in chunks:  # each chunk's own KV, prefilled alone at positions 0..n-1
        store.put(key, toy.reference_kv(tokens[b:e]))
    blender = Blender(toy, check_layer=1)
    policy, results = _policy(), []

    def job(ratio):
        return BlendJob(tokens=tokens, start=0, end=end, chunks=chunks, slots=slots, ratio=ratio, policy=policy,
                        chunk_kv=store.d)

    def written(r):  # what the blender left in the engine's cache at the span's slots
        blender.run(job(r))
        return toy.paged.read(slots)

    _check("ratio_1", lambda: _rel(written(1.0), toy.reference_kv(tokens[:end])), REL_TOL[dtype], results)
    concat = _concat(toy, store.d, chunks, end)
    _check("ratio_0", lambda: _elem(written(0.0), concat, ELEM_TOL[dtype]), 1.0, results)

    def fused():
        for c in toy.caches:
            c.zero_()
        raw = torch.cat([store.d[key] for _, _, key in chunks], 2)
        old = torch.cat([torch.arange(e - b) for b, e, _ in chunks])
        toy.paged.write_rerotated(raw, old, torch.arange(end), toy.inv_freq, "neox", slots)
        return _elem(toy.paged.read(slots), concat, ELEM_TOL[dtype])
    _check("fused", fused, 1.0, results)

    _check("per_layer", lambda: _per_layer(toy, blender, job, slots, dtype), 1.0, results)

    def partial():
        report = blender.run(job(0.15))
        return 0.0 if 0 < getattr(report, "recomputed", 1) <= end else 1.0
    _check("partial", partial, 0.5, results)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="default: llama-1b on cuda, tiny on cpu")
    p.add_argument("--json", help="also write the results there")
    args = p.parse_args(argv)
    name = args.shape or ("llama-1b" if args.device == "cuda" else "tiny")
    results = run_checks(SHAPES[name], getattr(torch, args.dtype), args.device)
    if args.json:
        meta = dict(shape=name, dtype=args.dtype, device=args.device, tokens=sum(SHAPES[name].chunks))
        Path(args.json).write_text(json.dumps(dict(meta, checks=results), indent=1))
    for r in results:
        err = "crash: " + r["crash"] if "crash" in r else f"error {r['error']:.3g} (tol {r['tol']:.3g})"
        print(f"{r['name']:<9} {'ok' if r['ok'] else 'FAIL'}  {err}  {r['seconds']:.1f}s")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
