"""The runtime around the compiled variants of one graph.

This first version always runs the full variant and returns the user outputs; the
SpecDiff controller (speculative pre-run, scores, tiers, schedule) builds on it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch.fx as fx

from .config import SpecDiffConfig
from .plan import DiTPlan
from .variants import Variant, build_variant


class SpecDiffRuntime:
    """Callable that Dynamo runs in place of the graph (one per shape specialisation)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], plan: DiTPlan,
                 config: SpecDiffConfig, mode: str | None = None) -> None:
        self.gm = gm
        self.plan = plan
        self.config = config
        self.mode = mode
        self.example_inputs = list(example_inputs)
        self.full: Variant = build_variant(gm, example_inputs, plan, config, "full", mode=mode)

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        user, _ = self.full.split(self.full(*args))
        return user
