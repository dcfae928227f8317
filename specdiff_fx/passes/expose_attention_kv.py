"""Full variant: return every attention call's image-token keys and values.

Reads: ``plan.attention`` (SDPA node names, their layouts and image offsets).
Writes: extra outputs ``k{i}`` / ``v{i}`` (``[B, H, N, d]``, the keys and values exactly
as fed to SDPA: after qk-norm and RoPE) in attention order.
Keeps true: the attention and every user output are unchanged.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name
from ..layout import sdpa_args
from .context import RewriteContext


def expose_attention_kv(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    nodes = nodes_by_name(gm)
    n = ctx.plan.num_image_tokens
    for i, site in enumerate(ctx.plan.attention):
        sdpa = nodes[site.node]
        args = sdpa_args(sdpa)
        with gm.graph.inserting_before(sdpa):
            for name in ("key", "value"):
                ctx.extras[f"{name[0]}{i}"] = gm.graph.call_function(
                    ops.image_segment, (args[name], 2, site.img_offset, n)
                )
    return gm
