"""Graph passes of the specdiff backend, one per file, applied in the orders below.

``specialize_shapes`` (dynamic graphs only), ``collapse_ulysses`` (context-parallel graphs
only) and ``analyze_dit`` (graph -> frozen DiTPlan) come first. Each rewrite pass is a function
``(gm, ctx) -> gm`` whose docstring says what it reads, writes and keeps true;
:func:`run_passes` lints, recompiles and re-propagates fake shapes after each one and logs
the graph at DEBUG on the ``specdiff_fx.passes`` logger.
"""

from .analyze_dit import DynamicShapes, NotADiT, analyze_dit
from .attend_with_kv_cache import attend_with_kv_cache
from .context import NewInput, RewriteContext, run_passes
from .blend_token_history import blend_token_history
from .collapse_ulysses import collapse_ulysses
from .expose_attention_kv import expose_attention_kv
from .expose_attention_score import expose_attention_score
from .expose_token_output import expose_token_output
from .few_row_linear import few_row_linear
from .finalize_outputs import finalize_outputs
from .gather_token_subset import gather_token_subset
from .skip_token_stream import skip_token_stream
from .specialize_shapes import read_scalars, specialize_shapes
from ..signature import VariantKey, VariantKind

#: full variant: the original computation plus K/V, score and per-token outputs
FULL_PASSES = (expose_attention_kv, expose_attention_score, expose_token_output, finalize_outputs)

#: subset variant: k image tokens computed with cached K/V for the rest; the others'
#: outputs blended from history; returns the user outputs of that tiered step too (the
#: full variant keeps Inductor's own code for the model's computation: ``few_row_linear``
#: only here; the skip variant computes no block and no embedder)
SPARSE_PASSES = (
    gather_token_subset,
    blend_token_history,
    attend_with_kv_cache,
    expose_attention_score,
    expose_token_output,
    few_row_linear,
    finalize_outputs,
)


#: skip variant: no token computed, the per-token outputs from history, then the epilogue
SKIP_PASSES = (skip_token_stream, finalize_outputs)


def passes_for(key: VariantKey, config) -> tuple:
    """The pass list of the variant ``key`` under ``config``: the attention score is only
    computed when the token score reads it (``score="attention"``)."""
    passes = {VariantKind.FULL: FULL_PASSES, VariantKind.SPARSE: SPARSE_PASSES, VariantKind.SKIP: SKIP_PASSES}[key.kind]
    if config.score != "attention":
        passes = tuple(p for p in passes if p is not expose_attention_score)
    return passes


__all__ = [
    "FULL_PASSES", "SKIP_PASSES", "SPARSE_PASSES", "DynamicShapes", "NotADiT", "NewInput", "RewriteContext", "analyze_dit",
    "attend_with_kv_cache", "blend_token_history", "collapse_ulysses", "expose_attention_kv", "expose_attention_score",
    "expose_token_output", "few_row_linear", "finalize_outputs", "gather_token_subset", "passes_for", "run_passes", "skip_token_stream",
    "read_scalars",
    "specialize_shapes",
]
