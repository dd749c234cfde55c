"""Named recompute policies: which selection parts each `recompute_policy` value is made of.

Pure Python (no torch), so the configuration can list and check the names anywhere. The parts
themselves are in kvplug/blend/selection.py; what each policy does and when to choose it is in
the README's "Blending" section.

    Selection(score, heads, relevance, deviation, budget, mix_weight)   one policy's parts
    POLICIES                                                            name -> Selection
"""
from __future__ import annotations

from dataclasses import dataclass

SCORES = ("deviation", "relevance", "mix")
RELEVANCE = ("prophet", "check")
DEVIATION = ("k", "v", "kv")
BUDGETS = ("global", "per_chunk", "adaptive", "relevance")
LAYERS = ("all", "late", "peak")  # kvplug/blend/relevance.py LAYERS


@dataclass(frozen=True)
class Selection:
    score: str = "deviation"  # what ranks cached tokens: one of SCORES
    heads: bool = False  # chunk heads first (blend_chunk_head_tokens of every chunk but the first)
    relevance: str = "prophet"  # where the question's attention comes from: one of RELEVANCE
    deviation: str = "kv"  # which deviation: one of DEVIATION
    budget: str = "global"  # one of BUDGETS
    mix_weight: float = 0.5  # score "mix": weight of relevance against deviation
    relevance_layers: str = "all"  # which layers' question attention counts: one of LAYERS

    def __post_init__(self):
        for name, allowed in (("score", SCORES), ("relevance", RELEVANCE), ("deviation", DEVIATION),
                              ("budget", BUDGETS), ("relevance_layers", LAYERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Selection.{name}={getattr(self, name)!r}: allowed values are {', '.join(allowed)}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"Selection.mix_weight={self.mix_weight!r}: must be in [0, 1]")

    @property
    def uses_deviation(self) -> bool:
        return self.score in ("deviation", "mix") or self.budget == "adaptive"

    @property
    def uses_relevance(self) -> bool:
        return self.score in ("relevance", "mix") or self.budget in ("adaptive", "relevance")

    @property
    def runs_check_pass(self) -> bool:
        """Layers 0..check run on every span token before the pick (CacheBlend)."""
        return self.uses_deviation or (self.uses_relevance and self.relevance == "check")


POLICIES: dict[str, Selection] = {
    "fixed": Selection(),
    "adaptive": Selection(budget="adaptive", relevance="check"),
    "epic": Selection(heads=True),
    "query": Selection(score="relevance", heads=True),
    "mixed": Selection(score="mix", heads=True),
    "a3": Selection(score="relevance", heads=True, relevance_layers="late", budget="relevance"),
    "critical": Selection(score="relevance", heads=True, relevance_layers="peak"),
}
