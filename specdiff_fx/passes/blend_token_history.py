"""Subset variant: the non-computed tokens get a blend of their past outputs, in-graph.

Reads: the ``specdiff_base`` input added by :func:`gather_token_subset` (must run first),
``config.history_depth`` (``H``: ``blend_history`` for the paper blend, else 2).
Writes: new inputs ``specdiff_history`` (``[H, B, N, C]``, the last ``H`` per-token
outputs, newest first: whole past steps for the paper blend, each token's last two
computed outputs otherwise) and ``specdiff_weights`` (``[B, N, H]``); ``specdiff_base`` is
replaced by :func:`specdiff_fx.ops.tier_blend` of the two and removed. The runtime sets
a token's weight row to one-hot on the newest output for reuse (tier C2), to the
normalised time-decay weights for blending (tier C3), and to anything for the computed
tier C1 (those rows are overwritten by the fresh outputs).
Keeps true: the tiered epilogue (blend, scatter, unpatchify) is part of the compiled
graph: no Python loop over tokens.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..signature import Port, Role
from .context import RewriteContext


def blend_token_history(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    base = next(n for n in gm.graph.find_nodes(op="placeholder") if n.name == Port(Role.BASE).input_name)
    val = base.meta["val"]
    history, weights = ctx.add_history_inputs(gm, val)
    with gm.graph.inserting_after(weights):
        blended = gm.graph.call_function(ops.tier_blend, (history, weights))
    base.replace_all_uses_with(blended)
    gm.graph.erase_node(base)
    ctx.new_inputs[:] = [i for i in ctx.new_inputs if i.port.role is not Role.BASE]
    return gm
