"""Both variants, last: write the output tuple and drop dead nodes.

Reads: ``ctx.extras`` (in insertion order).
Writes: the output node = user outputs + extras; ``gm.meta["specdiff_outputs"]`` counts
the user outputs (``"user"``) and lists the extras' ports (``"ports"``) and short names
(``"extras"``); dead code is removed.
Keeps true: the user outputs keep their positions.
"""

from __future__ import annotations

import torch.fx as fx

from .context import RewriteContext


def finalize_outputs(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    out = gm.graph.output_node()
    user = out.args[0]
    user = list(user) if isinstance(user, (tuple, list)) else [user]
    out.args = (tuple(user) + tuple(ctx.extras.values()),)
    gm.meta["specdiff_outputs"] = {"user": len(user), "ports": tuple(ctx.extras),
                                   "extras": tuple(p.key for p in ctx.extras)}
    gm.graph.eliminate_dead_code()
    return gm
