"""Both variants: return the per-token output before unpatchify.

Reads: ``plan.end`` (the output projection's node).
Writes: extra output ``tokens``: ``[B, N, C]`` in the full variant, ``[B, k, C]`` (in
the order of ``idx``) in the subset variant.
Keeps true: nothing else changes.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph_utils import nodes_by_name
from .context import RewriteContext


def expose_token_output(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    ctx.extras["tokens"] = nodes_by_name(gm)[ctx.plan.end]
    return gm
