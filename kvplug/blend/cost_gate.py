"""The blend cost gate: the scheduler claims a run of chunks for blending only where blending it
is predicted to take less time than letting vLLM prefill the same tokens.

Both predictions come from what the engine measures as it serves (pure Python, no tensors):
  prefill   seconds of each forward pass of the engine against the tokens it scheduled and their
            attention pairs (a token at context c attends to c + 1 keys: a request's n tokens from
            context c make n x (c + n/2) pairs; the worker times the passes), fitted as
            seconds = a + b x tokens + q x pairs; b is a token's cost through the weights, q a
            pair's in attention. Attention is why prefill cost grows faster than the tokens: a fit
            linear in tokens, learnt on short prompts, prices a long span's prefill far too low.
  blend     seconds of each blend batch the worker ran against (jobs, span tokens, recomputed
            tokens, the recomputed tokens' attention pairs), fitted as seconds = c x jobs +
            d x span + e x recomputed + f x pairs (c: a job's fixed cost - its relevance pass,
            metadata; d: gathering, re-rotating and writing a cached token; e, f: running a token
            through the layers)
Both fits are non-negative least squares with exponential forgetting (recent samples count most) and a small
ridge toward a first guess: until a blend has been measured, a recomputed token costs what a
prefilled one does (its pairs included) and nothing else costs anything. Until enough prefill steps
are measured the gate is not ready and the scheduler claims as it did without one.

    CostGate(forget=0.97, min_prefill_samples=4)
    .observe_prefill(seconds, tokens, pairs) / .observe_blend(seconds, jobs, span_tokens, recomputed, pairs)
    .ready                                 enough prefill samples to predict
    .prefill_s(tokens, context) / .blend_s(span_tokens, recomputed, context)   predicted marginal
                                           seconds of tokens that follow `context` cached ones
    .choose(start, options, explore=False) -> (index, explored)   the option (span_tokens,
                                           recomputed, prefilled_after), all from position start,
                                           with the least predicted time, -1 = claim nothing; with
                                           explore, the cheapest blend is taken even when
                                           prefilling wins, so that the blend fit stays measured
                                           (the scheduler explores a fixed share of requests)
"""
from __future__ import annotations

import itertools

import numpy as np


class _Fit:
    """Non-negative least squares of y = w . x over exponentially forgotten samples (factor lam
    per sample), with a small ridge pull toward the prior w0: well posed whatever the samples, the
    prior forgotten as soon as samples exist. No cost is negative, and the constraint is part of
    the fit: the features move together (a blend's span, recomputed tokens and pairs grow with
    each other), so an unconstrained fit trades a large negative weight for a large positive one,
    and zeroing the negative one afterwards predicted blends several times their measured cost.
    x is in tokens/1000 (pairs/10^6) and y in seconds, so the ridge is small against any real sample."""

    def __init__(self, w0: list[float], lam: float, ridge: float = 1e-6):
        n = len(w0)
        self.w0, self.lam, self.ridge, self.count = np.array(w0, dtype=float), lam, ridge, 0
        self.a, self.b = np.zeros((n, n)), np.zeros(n)
        self._w: np.ndarray | None = self.w0.copy()  # None: samples came since the last solve
        # Every set of weights allowed to be positive (the others are 0): with 3-4 features the exact
        # solution is the best of these few small solves.
        self._subsets = [np.array(c) for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]

    def update(self, x: list[float], y: float) -> None:
        x = np.array(x, dtype=float)
        self.a = self.lam * self.a + np.outer(x, x)
        self.b = self.lam * self.b + y * x
        self.count += 1
        self._w = None

    @property
    def w(self) -> np.ndarray:
        """The weights, solved when first read after new samples: samples come every engine step,
        predictions only when a request is claimed."""
        if self._w is None:
            n = len(self.w0)
            a, b = self.a + self.ridge * np.eye(n), self.b + self.ridge * self.w0
            best, best_f = np.zeros(n), 0.0  # objective w.a.w - 2 b.w; w = 0 gives 0
            for s in self._subsets:
                ws = np.linalg.solve(a[np.ix_(s, s)], b[s])
                if (ws >= 0).all() and (f := -float(b[s] @ ws)) < best_f:  # at the subset's optimum w.a.w = b.w
                    best, best_f = np.zeros(n), f
                    best[s] = ws
            self._w = best
        return self._w

    def predict(self, x: list[float]) -> float:
        return float(np.dot(self.w, x))


def attention_pairs(tokens: int, context: int) -> float:
    """Query-key pairs of `tokens` new tokens that follow `context` cached ones (causal)."""
    return tokens * (context + tokens / 2)


class CostGate:
    def __init__(self, forget: float = 0.97, min_prefill_samples: int = 4):
        self.min_prefill_samples = min_prefill_samples
        self._prefill = _Fit([0.0, 0.0, 0.0], forget)
        self._blend: _Fit | None = None  # made at the first blend sample, from the prefill rates
        self._forget = forget

    @property
    def ready(self) -> bool:
        return self._prefill.count >= self.min_prefill_samples

    def observe_prefill(self, seconds: float, tokens: int, pairs: float) -> None:
        if tokens > 0 and seconds > 0:
            self._prefill.update([1.0, tokens / 1e3, pairs / 1e6], seconds)

    def observe_blend(self, seconds: float, jobs: int, span_tokens: int, recomputed: int, pairs: float) -> None:
        if jobs <= 0 or seconds <= 0:
            return
        if self._blend is None:
            token_s, pair_s = self._rates()
            self._blend = _Fit([0.0, 0.0, token_s * 1e3, pair_s * 1e6], self._forget)
        self._blend.update([float(jobs), span_tokens / 1e3, recomputed / 1e3, pairs / 1e6], seconds)

    def _rates(self) -> tuple[float, float]:
        """Prefill seconds per token and per attention pair."""
        w = self._prefill.w
        return float(w[1]) / 1e3, float(w[2]) / 1e6

    def prefill_s(self, tokens: int, context: int = 0) -> float:
        token_s, pair_s = self._rates()
        return token_s * tokens + pair_s * attention_pairs(tokens, context)

    def blend_s(self, span_tokens: int, recomputed: int, context: int = 0) -> float:
        """A blend of span_tokens after `context` cached ones, recomputing `recomputed` of them
        (spread over the span: on average half of it before each)."""
        pairs = recomputed * (context + span_tokens / 2)
        if self._blend is None:
            token_s, pair_s = self._rates()
            return token_s * recomputed + pair_s * pairs
        return self._blend.predict([1.0, span_tokens / 1e3, recomputed / 1e3, pairs / 1e6])

    def choose(self, start: int, options: list[tuple[int, int, int]], explore: bool = False) -> tuple[int, bool]:
        """options: (span tokens blended from position start, of which recomputed, tokens vLLM
        prefills after the span up to where every option ends). Returns the cheapest (its index,
        or -1 for prefilling it all) and whether it was taken to explore. No side effects: the
        scheduler may ask again."""
        if not options:
            return -1, False
        total = max(s + p for s, _, p in options)  # every option covers the same tokens
        cost = [self.blend_s(span, rec, start) + self.prefill_s(after, start + span) for span, rec, after in options]
        best = min(range(len(options)), key=cost.__getitem__)
        if cost[best] < self.prefill_s(total, start):
            return best, False
        return (best, True) if explore else (-1, False)
