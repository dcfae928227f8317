"""What a generation's cached steps do with the context (text) tokens.

One number says it, the share of text tokens left to their K/V caches
(``SpecDiffConfig.effective_context_ratio``); :func:`text_mode` turns it into the sparse
variant's context mode for a graph.
"""

from __future__ import annotations

from ..plan import DiTPlan
from ..signature import ContextMode


def text_mode(ratio: float, plan: DiTPlan, guided: bool) -> tuple[ContextMode, int | None]:
    """The context mode (and text tokens computed) of cached steps that leave ``ratio`` of
    the ``M`` text tokens to their caches: ``CACHED`` when none is computed, ``COMPUTE``
    when all are, else ``SUBSET`` with ``k_txt = M - round(ratio * M)``.

    Where the graph supports no text subset (``plan.text_subset_error``) a ratio strictly
    between 0 and 1 gets all or nothing: ``CACHED`` unless the generation uses
    classifier-free guidance (``guided``), whose guidance scale amplifies the error of stale
    text K/V (measured: -6.7 dB on our SD3 model with CFG 4; +2.1 dB on our FLUX model
    without)."""
    m = plan.num_text_tokens
    k_txt = m - round(ratio * m)
    if ratio >= 1.0 or (m and k_txt == 0):
        return ContextMode.CACHED, None
    if ratio <= 0.0 or (m and k_txt >= m):
        return ContextMode.COMPUTE, None
    if plan.text_subset_error is not None or not m:
        return (ContextMode.COMPUTE if guided else ContextMode.CACHED), None
    return ContextMode.SUBSET, k_txt


def text_tokens(mode: ContextMode, k_txt: int | None, plan: DiTPlan) -> tuple[int, int] | None:
    """``(text tokens computed per sample on a cached step of context mode`` ``mode``, ``M)``
    for telemetry; ``None`` where the plan does not count the text tokens (no text subsets)."""
    m = plan.num_text_tokens
    if not m:
        return None
    return {ContextMode.CACHED: 0, ContextMode.SUBSET: k_txt}.get(mode, m), m
