"""Both variants: return the per-token output before unpatchify.

Reads: ``plan.end`` (the output projection's node); in the subset variant the nodes
:func:`gather_token_subset` recorded in ``ctx.memo``.
Writes: extra output ``tokens`` ``[B, N, C]``, the image tokens only (in the subset variant: fresh rows at
``idx``, the tier blend elsewhere) and, in the subset variant, ``subset`` ``[B, k, C]``
(the fresh rows, in the order of ``idx``).
Keeps true: nothing else changes.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name
from ..signature import Port, Role
from .context import RewriteContext


def expose_token_output(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    if "stream_out" in ctx.memo:
        ctx.extras[Port(Role.TOKENS)] = ctx.memo["stream_out"]
        if "subset_out" in ctx.memo:
            ctx.extras[Port(Role.SUBSET)] = ctx.memo["subset_out"]
    else:
        end, stream = nodes_by_name(gm)[ctx.plan.end], ctx.plan.stream
        if stream is not None:  # the image rows of a stream that carries context tokens too
            with gm.graph.inserting_after(end):
                end = gm.graph.call_function(ops.image_segment, (end, 1, stream.img_offset(), ctx.plan.num_image_tokens))
        ctx.extras[Port(Role.TOKENS)] = end
    return gm
