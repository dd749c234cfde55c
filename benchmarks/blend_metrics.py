"""Pure metric helpers of the blend benchmark (no engine, no torch): first-token KL, agreement,
confidence intervals, the smallest budget that reaches a quality bar.

    top_k(lp, k) / top1(lp) / top1_agree(ref, q)      first-token logprob dicts {token: logprob}
    kl_first_token(ref, q, k)                         KL(p_ref || q) over the reference's top-k
    agreement(texts, refs) / value_agreement(texts, refs, key)   (matches, compared)
    first_number(text)                                the first integer of a text (synthetic answers)
    wilson_ci(successes, n, z)                        95% score interval of a proportion
    paired_bootstrap_ci(a, b, reps, seed)             95% interval of mean(a - b) over paired 0/1 outcomes
    smallest_reaching(points, target)                 the least recomputed fraction whose accuracy >= target
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

LOGPROBS = 20
KL_METHOD = (f"KL(p_ref || q) over the reference's top-{LOGPROBS} first-token candidates: both "
             "distributions renormalised over that set; a token missing from q's returned list "
             "gets q's smallest returned logprob")


def top_k(lp: dict, k: int = LOGPROBS) -> dict:
    """The k highest entries of {token: logprob} (vLLM may add the sampled token as a k+1-th)."""
    return dict(sorted(lp.items(), key=lambda kv: kv[1], reverse=True)[:k])


def kl_first_token(ref: dict, q: dict, k: int = LOGPROBS) -> float:
    """KL(p_ref || q) restricted to the reference's top-k tokens (see KL_METHOD)."""
    ref = top_k(ref, k)
    if not ref or not q:
        return math.nan
    floor = min(q.values())
    lq = {t: q.get(t, floor) for t in ref}

    def norm(d):
        m = max(d.values())
        z = m + math.log(sum(math.exp(v - m) for v in d.values()))
        return {t: v - z for t, v in d.items()}

    p, lq = norm(ref), norm(lq)
    return max(0.0, sum(math.exp(p[t]) * (p[t] - lq[t]) for t in p))


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


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], reps: int = 4000,
                        seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(a - b), resampling questions (the pairs) with replacement."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} paired outcomes")
    if not a:
        return (math.nan, math.nan)
    d = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(reps))
    return (means[int(0.025 * reps)], means[min(reps - 1, int(0.975 * reps))])


def smallest_reaching(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The least recomputed fraction x among (x, accuracy) points with accuracy >= target, or None."""
    ok = [x for x, acc in points if not math.isnan(acc) and acc >= target - 1e-12]
    return min(ok) if ok else None
