"""Subset variant, first: the graph stops returning the model's own output.

The subset graph returns per-token results only (the runtime assembles the image), so
whatever follows the output projection (e.g. SD3's unpatchify, whose sizes spell the
full token grid) is cut before the token count changes.

Reads: ``plan.end``.
Writes: the output node returns ``(end,)``; nodes that only fed the user outputs are removed.
Keeps true: every node before ``end`` is untouched.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph_utils import nodes_by_name
from .context import RewriteContext


def drop_user_outputs(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    out = gm.graph.output_node()
    out.args = ((nodes_by_name(gm)[ctx.plan.end],),)
    gm.graph.eliminate_dead_code()
    ctx.keep_user_outputs = False
    return gm
