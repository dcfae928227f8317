"""Both variants: return the per-token output before unpatchify.

Reads: ``plan.end`` (the output projection's node); in the subset variant the nodes
:func:`gather_token_subset` recorded in ``ctx.memo``.
Writes: extra output ``tokens`` ``[B, N, C]`` (in the subset variant: fresh rows at
``idx``, the tier blend elsewhere) and, in the subset variant, ``subset`` ``[B, k, C]``
(the fresh rows, in the order of ``idx``).
Keeps true: nothing else changes.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph_utils import nodes_by_name
from ..signature import Port, Role
from .context import RewriteContext


def expose_token_output(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    if "stream_out" in ctx.memo:
        ctx.extras[Port(Role.TOKENS)] = ctx.memo["stream_out"]
        if "subset_out" in ctx.memo:
            ctx.extras[Port(Role.SUBSET)] = ctx.memo["subset_out"]
    else:
        ctx.extras[Port(Role.TOKENS)] = nodes_by_name(gm)[ctx.plan.end]
    return gm
