"""Skip variant: no token is computed; every per-token output comes from history.

Reads: ``plan.end`` (the output projection's node, ``[B, N, C]``; ``[B, L, C]`` when the stream
carries context tokens too, ``plan.stream``), ``config.history_depth``.
Writes: new inputs ``Role.HISTORY`` (``[H, B, N, C]``, each image token's last computed
outputs, newest first) and ``Role.WEIGHTS`` (``[B, N, H]``); every user of ``plan.end`` reads
:func:`specdiff_fx.ops.tier_blend` of the two instead (for a stream with context tokens, the
blend as its image segment and zeros as the context rows, :func:`~specdiff_fx.ops.restore_stream`,
as a sparse variant that cached the context has them); extra output ``Role.TOKENS`` is the
blend. The transformer's own computation is then dead code, which the runner's final
dead-code removal drops: what is left is the blend and whatever follows the output
projection (unpatchify).
Keeps true: the user outputs are exactly what the full graph returns when its per-token
output equals the blend (the epilogue is the model's own; it reads image rows only).
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name
from ..signature import Port, Role
from .context import RewriteContext


def skip_token_stream(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    plan = ctx.plan
    end = nodes_by_name(gm)[plan.end]
    val = end.meta.get("val", end.meta.get("example_value"))
    image = val.narrow(1, plan.stream.img_offset(), plan.num_image_tokens) if plan.stream is not None else val
    history, weights = ctx.add_history_inputs(gm, image)
    with gm.graph.inserting_after(end):
        blended = whole = gm.graph.call_function(ops.tier_blend, (history, weights))
    if plan.stream is not None:
        with gm.graph.inserting_after(blended):
            whole = gm.graph.call_function(ops.restore_stream, (blended, blended, plan.stream.spec(), False))
    end.replace_all_uses_with(whole)
    ctx.extras[Port(Role.TOKENS)] = blended
    return gm
