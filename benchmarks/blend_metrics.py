"""Pure metric helpers of the blend benchmark (no engine, no torch): first-token KL, answer
log-likelihood, agreement, confidence intervals, the smallest budget that reaches a quality bar.

    top_k(lp, k) / top1(lp) / top1_agree(ref, q)      first-token logprob dicts {token: logprob}
    kl_first_token(ref, q, k)                         KL(p_ref || q) over the reference's top-k + a tail bucket
    mean_loglik(logprobs)                             mean log-likelihood per token of a forced answer
    agreement(texts, refs) / value_agreement(texts, refs, key)   (matches, compared)
    first_number(text)                                the first integer of a text (synthetic answers)
    wilson_ci(successes, n, z)                        95% score interval of a proportion
    bootstrap_mean_ci(x, reps, seed)                  95% interval of mean(x), resampling questions
    paired_bootstrap_ci(a, b, reps, seed)             95% interval of mean(a - b) over paired outcomes
    smallest_reaching(points, target)                 the least recomputed fraction whose accuracy >= target
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

LOGPROBS = 50  # top-k logprobs vLLM returns per generated token (the engines set max_logprobs to it)
KL_METHOD = (f"KL(p_ref || q) of the first answer token over the reference's top-{LOGPROBS} tokens plus one "
             "bucket for the rest of the vocabulary (1 - their mass under each distribution); vLLM's "
             "logprobs are normalised over the full vocabulary, so this is the exact KL of the two "
             "distributions coarse-grained to k+1 outcomes, a lower bound on the full-vocabulary KL. "
             f"A reference token missing from q's top-{LOGPROBS} gets q's smallest returned logprob "
             "(an upper bound on its probability)")


def top_k(lp: dict, k: int = LOGPROBS) -> dict:
    """The k highest entries of {token: logprob} (vLLM may add the sampled token as a k+1-th)."""
    return dict(sorted(lp.items(), key=lambda kv: kv[1], reverse=True)[:k])


def kl_first_token(ref: dict, q: dict, k: int = LOGPROBS) -> float:
    """KL(p_ref || q) over the reference's top-k tokens and a tail bucket (see KL_METHOD)."""
    ref = top_k(ref, k)
    if not ref or not q:
        return math.nan
    floor = min(q.values())
    p = [math.exp(v) for v in ref.values()]
    qs = [math.exp(q.get(t, floor)) for t in ref]
    p_tail, q_tail = max(0.0, 1.0 - sum(p)), max(1e-12, 1.0 - sum(qs))
    kl = sum(a * math.log(a / max(b, 1e-30)) for a, b in zip(p, qs) if a > 0)
    if p_tail > 0:
        kl += p_tail * math.log(p_tail / q_tail)
    return max(0.0, kl)


def mean_loglik(logprobs: Sequence[float]) -> float:
    """Mean log-likelihood per token of a teacher-forced answer (nan for none)."""
    return sum(logprobs) / len(logprobs) if logprobs else math.nan


def top1(lp: dict):
    return max(lp.items(), key=lambda kv: kv[1])[0] if lp else None


def top1_agree(ref: dict, q: dict) -> bool:
    return top1(ref) is not None and top1(ref) == top1(q)


def agreement(texts: Sequence[str], ref_texts: Sequence[str]) -> tuple[int, int]:
    """(exact matches, compared) of two equally long lists of generated texts."""
    if len(texts) != len(ref_texts):
        raise ValueError(f"{len(texts)} texts vs {len(ref_texts)} reference texts")
    return sum(a == b for a, b in zip(texts, ref_texts)), len(texts)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text.replace(",", ""))
    return m.group(0) if m else None


def value_agreement(texts: Sequence[str], ref_texts: Sequence[str],
                    key: Callable[[str], object] = first_number) -> tuple[int, int]:
    """(answers whose key - by default the first integer - equals the reference's, compared)."""
    if len(texts) != len(ref_texts):
        raise ValueError(f"{len(texts)} texts vs {len(ref_texts)} reference texts")
    return sum(key(a) == key(b) for a, b in zip(texts, ref_texts)), len(texts)


def wilson_ci(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (sound at 0 and n, unlike the normal approximation)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_ci(x: Sequence[float], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(x), resampling the questions with replacement (nan
    entries are dropped first)."""
    d = np.asarray([v for v in x if not math.isnan(v)], dtype=np.float64)
    if d.size == 0:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(reps, d.size))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return (float(lo), float(hi))


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], reps: int = 4000,
                        seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(a - b), resampling questions (the pairs) with replacement;
    pairs with a nan on either side are dropped."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} paired outcomes")
    return bootstrap_mean_ci([x - y for x, y in zip(a, b)], reps, seed)


def smallest_reaching(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The least recomputed fraction x among (x, accuracy) points with accuracy >= target, or None."""
    ok = [x for x, acc in points if not math.isnan(acc) and acc >= target - 1e-12]
    return min(ok) if ok else None
