"""The quality guard's controller: raises the engine's recompute ratio while audited blends say
the answers move, and lowers it again once they do not.

The worker audits a sampled share of blends (blend_audit_rate): the span computed exactly as well,
and the KL divergence of the question's next-token distribution under exact vs blended KV
(kvplug/blend/blender.py `_audit`). The scheduler feeds those KLs here. While the mean of the last
`window` audited KLs is above max_kl, each new window raises the floor one step of STEPS (up to
1.0: every token recomputed); when a window's mean is under max_kl / 4 it lowers it one step. A
request's recompute ratio is max(its own, the floor). Pure Python: the scheduler's side.

    QualityGuard(max_kl, window=3)
    .observe(kl) -> str | None   a one-line message when the floor changes, else None
    .floor                       the current floor on the recompute ratio (0.0: not raised)
"""
from __future__ import annotations

STEPS = (0.0, 0.15, 0.3, 0.5, 0.75, 1.0)


class QualityGuard:
    def __init__(self, max_kl: float, window: int = 3):
        if max_kl <= 0 or window < 1:
            raise ValueError(f"QualityGuard(max_kl={max_kl}, window={window}): need max_kl > 0 and window >= 1")
        self.max_kl, self.window = max_kl, window
        self._level = 0  # index into STEPS
        self._recent: list[float] = []

    @property
    def floor(self) -> float:
        return STEPS[self._level]

    def observe(self, kl: float) -> str | None:
        self._recent.append(kl)
        if len(self._recent) < self.window:
            return None
        mean = sum(self._recent) / len(self._recent)
        self._recent = []  # the next decision sees only blends made at the new floor
        before = self._level
        if mean > self.max_kl and self._level < len(STEPS) - 1:
            self._level += 1
        elif mean < self.max_kl / 4 and self._level > 0:
            self._level -= 1
        if self._level == before:
            return None
        way = "raised" if self._level > before else "lowered"
        return (f"blend quality guard: mean audited KL {mean:.4g} over {self.window} blends "
                f"(blend_max_kl {self.max_kl:g}): recompute ratio floor {way} to {self.floor:g}")
