"""Skip variant: no token is computed; every per-token output comes from history.

Reads: ``plan.end`` (the output projection's node, ``[B, N, C]``), ``config.history_depth``.
Writes: new inputs ``Role.HISTORY`` (``[H, B, N, C]``, each token's last computed outputs,
newest first) and ``Role.WEIGHTS`` (``[B, N, H]``); every user of ``plan.end`` reads
:func:`specdiff_fx.ops.tier_blend` of the two instead; extra output ``Role.TOKENS`` is that
blend. The transformer's own computation is then dead code, which the runner's final
dead-code removal drops: what is left is the blend and whatever follows the output
projection (unpatchify).
Keeps true: the user outputs are exactly what the full graph returns when its per-token
output equals the blend (the epilogue is the model's own).
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name
from ..signature import Port, Role
from .context import RewriteContext


def skip_token_stream(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    end = nodes_by_name(gm)[ctx.plan.end]
    val = end.meta.get("val", end.meta.get("example_value"))
    history, weights = ctx.add_history_inputs(gm, val)
    with gm.graph.inserting_after(end):
        blended = gm.graph.call_function(ops.tier_blend, (history, weights))
    end.replace_all_uses_with(blended)
    ctx.extras[Port(Role.TOKENS)] = blended
    return gm
