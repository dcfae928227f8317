"""Both variants, last: write the output tuple and drop dead nodes.

Reads: ``ctx.extras`` (in insertion order) and ``ctx.keep_user_outputs``.
Writes: the output node = (user outputs if kept) + extras; ``gm.meta["specdiff_outputs"]``
names the extras; dead code (e.g. the unpatchify of the subset graph) is removed.
Keeps true: the user outputs of the full variant keep their positions.
"""

from __future__ import annotations

import torch.fx as fx

from .context import RewriteContext


def finalize_outputs(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    out = gm.graph.output_node()
    user = out.args[0]
    user = list(user) if isinstance(user, (tuple, list)) else [user]
    kept = user if ctx.keep_user_outputs else []
    out.args = (tuple(kept) + tuple(ctx.extras.values()),)
    gm.meta["specdiff_outputs"] = {
        "user": len(kept),
        "extras": tuple(ctx.extras),
    }
    gm.graph.eliminate_dead_code()
    return gm
