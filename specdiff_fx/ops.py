"""Small tensor functions the rewrite passes insert into graphs as ``call_function`` nodes.

Each is plain, traceable PyTorch (no data-dependent Python control flow), so AOT autograd
and Inductor trace straight through them and the plain-FX path just calls them; the one
exception, :func:`few_row_linear`, is an opaque custom op on purpose (see its comment).
Shapes: ``B`` batch, ``k`` computed image tokens, ``N`` all image tokens.
"""

from __future__ import annotations

import math

import torch


def layout_index(idx: torch.Tensor, spec: tuple[tuple[str, int], ...],
                 text: bool | torch.Tensor = True) -> torch.Tensor:
    """Positions in a full token axis laid out as ``spec`` that the subset axis keeps.

    ``idx`` is ``[B, k]`` (image-token indices); ``spec`` is e.g. ``(("txt", M), ("img", N))``.
    Returns ``[B, L_sub]`` long, in the order of ``spec``: image positions at ``idx``; text
    positions kept whole (``text=True``), none (``False``: context caching), or, for a text
    subset, at ``text`` (``[B, k_txt]`` positions within the text segment; a ``spec`` with a
    text subset holds one text segment).
    """
    parts, off = [], 0
    batch = idx.shape[0]
    for kind, length in spec:
        if kind == "img":
            parts.append(idx + off)
        elif isinstance(text, torch.Tensor):
            parts.append(text + off)
        elif text:
            parts.append(torch.arange(off, off + length, device=idx.device).expand(batch, length))
        off += length
    if not parts:
        return idx[:, :0]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def take_tokens(x: torch.Tensor, rank: int, axis: int, index: torch.Tensor) -> torch.Tensor:
    """Gather ``index`` (``[B, L']``) along ``axis`` of ``x`` seen at rank ``rank``.

    ``x`` may have fewer dims than ``rank`` (it broadcasts from the right, like a RoPE
    table ``[S, d]`` against ``[B, S, H, d]``) and a batch dim of 1; the result has rank
    ``rank`` and batch ``B``.
    """
    if x.dim() < rank:
        x = x.reshape((1,) * (rank - x.dim()) + tuple(x.shape))
    batch, kept = index.shape
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    view = [1] * rank
    view[0], view[axis] = batch, kept
    size = list(x.shape)
    size[axis] = kept
    return torch.gather(x, axis, index.reshape(view).expand(size))


def image_segment(x: torch.Tensor, axis: int, offset: int, length: int) -> torch.Tensor:
    """The image tokens of a joint tensor, as a fresh contiguous tensor."""
    return x.narrow(axis, offset, length).contiguous()


def text_segment(x: torch.Tensor, axis: int, offset: int, length: int) -> torch.Tensor:
    """The text tokens of a joint tensor (everything but the image segment at
    ``offset``, ``length`` long), in order, as a fresh contiguous tensor."""
    before = x.narrow(axis, 0, offset)
    after = x.narrow(axis, offset + length, x.shape[axis] - offset - length)
    return torch.cat([before, after], dim=axis).contiguous()


def _row_index(idx: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the rows ``idx`` (``[B, k]``) of a ``[B, H, N, d]`` tensor, every head, as
    ``index_put_`` takes them (broadcast to ``[B, H, k]``)."""
    b, k = idx.shape
    return (torch.arange(b, device=idx.device).reshape(b, 1, 1),
            torch.arange(heads, device=idx.device).reshape(1, heads, 1), idx.reshape(b, 1, k))


def extrapolate(cache: torch.Tensor, prev: torch.Tensor, ratio: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cached keys (or values) ``[B, H, N, d]`` extrapolated to first order from the
    computation before (``prev``, same shape): ``cache + ratio * (cache - prev)``, with
    ``ratio`` per token (``[B, N]``) or per sample (``[B]``), computed and returned in
    ``dtype`` (default: the caches'; caches stored in a narrower dtype are widened first)."""
    dtype = dtype or cache.dtype
    cache, prev = cache.to(dtype), prev.to(dtype)
    return torch.addcmul(cache, ratio.to(dtype).reshape(cache.shape[0], 1, -1, 1), cache - prev)


def cached_rows(cache: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, prev: torch.Tensor | None = None,
                ratio: torch.Tensor | None = None) -> torch.Tensor:
    """The keys (or values) of all tokens of one cache: ``cache`` (``[B, H, N, d]``) with the
    fresh ``rows`` (``[B, H, k, d]``) of the tokens ``idx`` (``[B, k]``) written in place.

    With ``prev`` (``[B, H, N, d]``, each token's keys from the computation before the one in
    ``cache``) and ``ratio`` (``[B, N]`` per token, or ``[B]``) the other tokens' keys are
    extrapolated to first order, ``cache + ratio * (cache - prev)``, and both caches shift in
    place at ``idx``: ``prev <- cache``, ``cache <- rows``.

    The caches may be stored in a narrower dtype than ``rows`` (``kv_dtype``): the fresh rows
    are rounded to it where they are written, and the keys returned are the caches' without
    extrapolation, in ``rows``' dtype with it (extrapolated in that dtype, the fresh rows
    unrounded).

    The caches are written with ``index_put_``, which Inductor performs in place on the
    caller's tensors when the variant is compiled with ``variants.IN_PLACE_CACHES`` (its
    re-inplacing pass knows ``index_put_``; for ``scatter_`` on a graph input, or with its
    locality reordering on, it copied each whole cache, wrote into the copy and copied it
    back: six extra passes over ``N`` rows per cache and call).
    """
    heads = rows.shape[1]
    where = _row_index(idx, heads)
    if prev is None:
        cache.index_put_(where, rows.to(cache.dtype))
        return cache
    keys = extrapolate(cache, prev, ratio, rows.dtype).index_put(where, rows)
    prev.index_put_(where, cache[where])
    cache.index_put_(where, rows.to(cache.dtype))
    return keys


def attend_keys(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, offset: int,
                prev: torch.Tensor | None = None, ratio: torch.Tensor | None = None,
                text: torch.Tensor | None = None, text_prev: torch.Tensor | None = None,
                text_ratio: torch.Tensor | None = None, text_offset: int = 0,
                text_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Write the fresh image keys (or values) of the subset into ``cache`` and return the
    joint key tensor over *all* tokens.

    ``cache``: ``[B, H, N, d]`` image-token keys of this attention, each token's from the
    last step that computed it (mutated in place); ``fresh``: ``[B, H, L_sub, d]`` keys of
    the computed tokens, image segment at ``offset`` with ``k = idx.shape[1]`` tokens;
    returns ``[B, H, L_sub - k + N, d]``.

    With ``prev`` (``[B, H, N, d]``, each token's keys from the computation *before* the
    one in ``cache``; mutated in place too) and ``ratio`` (``[B, N]``) the cached keys are
    extrapolated to first order, ``cache + ratio * (cache - prev)``, before the attention
    uses them; the computed tokens' rows shift: ``prev <- cache``, ``cache <- fresh``
    (:func:`cached_rows`).

    With ``text`` (``[B, H, M, d]``, context caching) ``fresh`` holds the image subset only
    (``offset`` 0) and the text keys come from ``text`` (extrapolated with ``text_prev``
    and ``text_ratio`` ``[B]`` when given; never written), split around the image segment
    at ``text_offset`` as in the model's own order; returns ``[B, H, M + N, d]``.

    With ``text`` and ``text_idx`` (``[B, k_txt]``, a text subset) ``fresh`` holds the
    computed text tokens too (everything but its image segment, in ``text_idx`` order), and
    ``text`` is a cache like ``cache``: written in place at ``text_idx`` (with ``text_prev``
    and a per-token ``text_ratio`` ``[B, M]``: extrapolated and shifted the same way); the
    attention sees all ``M`` text keys, split around the image segment at ``text_offset``.

    The flat argument list is deliberate: this function is an FX ``call_function`` target,
    and FX only finds the nodes an argument depends on inside tuples, lists and dicts (a
    dataclass grouping the caches would hide them); the pass passes the optional ones as
    keyword arguments, which keeps the graph readable.
    """
    k = idx.shape[1]
    keys = cached_rows(cache, fresh.narrow(2, offset, k), idx, prev, ratio)
    if text is None:
        before = fresh.narrow(2, 0, offset)
        after = fresh.narrow(2, offset + k, fresh.shape[2] - offset - k)
    else:
        if text_idx is not None:
            text = cached_rows(text, text_segment(fresh, 2, offset, k), text_idx, text_prev, text_ratio)
        elif text_prev is not None:
            text = extrapolate(text, text_prev, text_ratio, fresh.dtype)
        text = text.to(fresh.dtype)
        before = text.narrow(2, 0, text_offset)
        after = text.narrow(2, text_offset, text.shape[2] - text_offset)
    return torch.cat([before, keys.to(fresh.dtype), after], dim=2)


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    img_offset: int,
    n_img: int,
    max_queries: int,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each image token receives: head-mean softmax column mass, ``[B, N]``.

    The softmax rows are those of the attention itself (same keys, same scale, same
    ``mask``: boolean, ``True`` = may attend, or additive, broadcast against
    ``[B, H, S_q, S_k]``; a query row with every key masked receives and gives nothing).
    With ``max_queries > 0`` only every ``ceil(S_q / max_queries)``-th query row is used
    and the column sums are scaled back by the sampling ratio.

    Cost per call: one ``[B, H, S_q', d] x [B, H, d, S_k]`` matmul plus a softmax over
    ``[B, H, S_q', S_k]`` (``S_q' <= max_queries``), i.e. ``S_q'/S_q`` of the attention's
    own ``QK^T``. Memory: that ``S_q' x S_k`` map for one attention call at a time,
    never the ``N x N`` maps of all heads and layers together.
    """
    n_q = query.shape[-2]
    if max_queries and n_q > max_queries:
        step = math.ceil(n_q / max_queries)
        query = query[..., ::step, :]
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] == n_q:
            mask = mask[..., ::step, :]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = torch.matmul(query.float() * scale, key.float().transpose(-1, -2))
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    mass = probs.mean(dim=1).sum(dim=1)
    return mass.narrow(1, img_offset, n_img) * (n_q / query.shape[-2])


def restore_stream(subset: torch.Tensor, image: torch.Tensor, spec: tuple[tuple[str, int], ...],
                   keep_txt: bool = True) -> torch.Tensor:
    """A token stream at full length ``[B, L, C]`` laid out as ``spec``: the image segment
    from ``image`` (``[B, N, C]``) and each context segment from ``subset`` (the subset
    graph's stream end, image segment ``k = subset.shape[1] - (context tokens)`` long), or
    zeros when context caching did not compute them (``keep_txt=False``)."""
    parts, off = [], 0
    n_ctx = sum(length for kind, length in spec if kind != "img")
    k = subset.shape[1] - (n_ctx if keep_txt else 0)
    for kind, length in spec:
        if kind == "img":
            parts.append(image.to(subset.dtype))
            off += k
        elif keep_txt:
            parts.append(subset.narrow(1, off, length))
            off += length
        else:
            parts.append(subset.new_zeros(subset.shape[0], length, *subset.shape[2:]))
    return torch.cat(parts, dim=1)


def scatter_tokens(subset: torch.Tensor, idx: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` (``[B, N, C]``) with rows ``idx`` (``[B, k]``) replaced by ``subset`` (``[B, k, C]``)."""
    index = idx.unsqueeze(-1).expand(-1, -1, subset.shape[-1])
    return base.to(subset.dtype).scatter(1, index, subset)


def tier_blend(history: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-token weighted sum of past outputs: ``history`` ``[H, B, N, C]``, ``weights``
    ``[B, N, H]`` -> ``[B, N, C]``. Reuse is a one-hot row, blend a normalised one.

    Written as ``H`` products and sums (``H`` is static and small: 2, or ``blend_history``),
    not as an ``einsum``: as a batched matrix product over ``H`` Inductor's CPU code made it a
    reduction of length ``H`` with an OpenMP region per token row, which took 6.4 ms of a 20.6 ms
    cached call on a 256-token model (BENCHMARKS.md, "The history blend's OpenMP regions"); as
    products it is one elementwise kernel, fused with the scatter after it."""
    w = weights.to(history.dtype)
    out = history[0] * w[..., 0:1]
    for h in range(1, history.shape[0]):
        out = out + history[h] * w[..., h:h + 1]
    return out


# -- context parallelism (Ulysses) -------------------------------------------------------
# Under diffusers' context parallelism each rank holds a shard of the tokens; an attention
# exchanges its q/k/v so that each rank attends over *all* tokens with a share of the heads,
# then exchanges the outputs back (DeepSpeed-Ulysses). :func:`collapse_ulysses
# <specdiff_fx.passes.collapse_ulysses>` folds diffusers' traced exchange into
# :func:`ulysses_attention`, whose operands are this rank's tokens with all heads: to the
# rest of the backend it is an attention over local tokens, so token subsets stay in the
# local layout. The K/V caches live in the layout the attention reads after the exchange
# (every rank's tokens, this rank's heads: :func:`ulysses_attention_kv`), so a cached step
# sends only its computed tokens through the exchange (:func:`ulysses_attend_cached`).


def _all_to_all(x: torch.Tensor, group_name: str, world_size: int) -> torch.Tensor:
    """Chunk ``i`` of ``x`` (axis 0, ``world_size`` equal chunks) goes to rank ``i``; chunk
    ``i`` of the result came from rank ``i``."""
    flat = x.contiguous().flatten()
    split = [flat.numel() // world_size] * world_size
    out = torch.ops._c10d_functional.all_to_all_single(flat, split, split, group_name)
    return torch.ops._c10d_functional.wait_tensor(out).reshape(x.shape)


def _scatter_heads(x: torch.Tensor, group_name: str, w: int) -> torch.Tensor:
    """``[B, H, S, d]`` (this rank's tokens, all heads) -> ``[B, H/W, W*S, d]`` (every rank's
    tokens in rank order, this rank's heads)."""
    b, h, s, d = x.shape
    x = _all_to_all(x.reshape(b, w, h // w, s, d).transpose(0, 1), group_name, w)  # [W(src), B, H/W, S, d]
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // w, w * s, d)


def _scatter_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group_name: str,
                 w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_scatter_heads` of the three operands, in one exchange where they have the same
    shape and dtype (one collective instead of three: on small steps its latency, not its
    bytes, is what an exchange costs)."""
    if query.shape == key.shape == value.shape and query.dtype == key.dtype == value.dtype:
        b = query.shape[0]
        return tuple(_scatter_heads(torch.cat([query, key, value]), group_name, w).split(b))
    return tuple(_scatter_heads(t, group_name, w) for t in (query, key, value))


def _gather_heads(x: torch.Tensor, group_name: str, w: int) -> torch.Tensor:
    """The reverse of :func:`_scatter_heads`: ``[B, H/W, W*S, d]`` -> ``[B, H, S, d]``."""
    b, h, ws, d = x.shape
    x = x.reshape(b, h, w, ws // w, d).permute(2, 0, 1, 3, 4)  # [W(dst), B, H/W, S, d]
    x = _all_to_all(x, group_name, w)  # [W(src head group), B, H/W, S, d]
    return x.transpose(0, 1).reshape(b, h * w, ws // w, d)


def _rank_rows(x: torch.Tensor, w: int, offset: int, length: int, rest: bool = False) -> torch.Tensor:
    """Of an exchanged ``[B, h, W*S, d]`` tensor, the rows ``offset ... offset + length - 1``
    of every rank's chunk (``rest=True``: every other row), rank-major: ``[B, h, W*length, d]``."""
    b, h, ws, d = x.shape
    chunks = x.reshape(b, h, w, ws // w, d)
    part = text_segment(chunks, 3, offset, length) if rest else chunks.narrow(3, offset, length)
    return part.reshape(b, h, -1, d)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, *, group_name: str, world_size: int) -> torch.Tensor:
    """Scaled dot-product attention over the tokens of every rank, from this rank's tokens.

    ``query`` ``[B, H, S_q, d]``, ``key``/``value`` ``[B, H, S_k, d]``: this rank's tokens
    with all ``H`` heads (every rank passes the same ``S_q`` and ``S_k``). Heads are split
    as diffusers splits them (rank ``r`` gets heads ``r * H/W ... (r + 1) * H/W - 1``);
    after the exchange a rank sees the tokens of all ranks in rank order, attends, and the
    reverse exchange returns ``[B, H, S_q, d]``: this rank's queries, all heads. Without a
    mask the order of the keys does not matter, so a rank's tokens may be any subset (the
    same count on every rank).
    """
    w = world_size
    out = torch.nn.functional.scaled_dot_product_attention(
        *_scatter_qkv(query, key, value, group_name, w),
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return _gather_heads(out, group_name, w)


def ulysses_attention_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                         scale: float | None = None, *, group_name: str, world_size: int, img_offset: int, n_img: int,
                         text: bool = False) -> tuple[torch.Tensor, ...]:
    """:func:`ulysses_attention` that also returns the keys and values as the attention saw
    them (after the exchange): ``(out, k_img, v_img)``, the image tokens of every rank,
    ``[B, H/W, W*N, d]`` in rank order (``img_offset``, ``n_img``: where the image segment
    lies in each rank's ``S_k`` tokens); with ``text`` also ``(k_txt, v_txt)``, every other
    token, ``[B, H/W, W*(S_k - N), d]``. These are the K/V caches of a context-parallel
    graph: each rank keeps every token's keys for its own heads, the layout the attention
    reads, so a cached step exchanges only the computed tokens' keys."""
    w = world_size
    queries, keys, values = _scatter_qkv(query, key, value, group_name, w)
    out = torch.nn.functional.scaled_dot_product_attention(
        queries, keys, values,
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    kv = tuple(_rank_rows(t, w, img_offset, n_img) for t in (keys, values))
    if text:
        kv = kv + tuple(_rank_rows(t, w, img_offset, n_img, rest=True) for t in (keys, values))
    return (_gather_heads(out, group_name, w),) + kv


def ulysses_attend_cached(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                          offset: int, cache_k: torch.Tensor, cache_v: torch.Tensor,
                          prev_k: torch.Tensor | None = None, prev_v: torch.Tensor | None = None,
                          ratio: torch.Tensor | None = None, text_k: torch.Tensor | None = None,
                          text_v: torch.Tensor | None = None, text_prev_k: torch.Tensor | None = None,
                          text_prev_v: torch.Tensor | None = None, text_ratio: torch.Tensor | None = None,
                          fresh_text: bool = False, dropout_p: float = 0.0, is_causal: bool = False,
                          scale: float | None = None, *, group_name: str, world_size: int):
    """A cached step's attention under context parallelism: only the computed tokens go
    through the exchange; every other key and value comes from this rank's caches, which
    hold every rank's tokens for this rank's heads (:func:`ulysses_attention_kv`'s layout).

    ``query``/``key``/``value`` ``[B, H, S, d]``: this rank's computed tokens (the image
    subset at ``offset``, ``k`` long, and any computed text tokens around it), all heads;
    ``idx`` ``[B, W*k]``: the image subset of every rank as positions in the rank-major
    image order (:func:`global_index`); ``cache_k``/``cache_v`` ``[B, H/W, W*N, d]`` (and
    ``prev_*``, ``ratio`` ``[B, W*N]``): written and extrapolated as in :func:`cached_rows`.
    ``text_k``/``text_v`` ``[B, H/W, W*M, d]`` (with ``text_prev_*``, ``text_ratio`` ``[B]``):
    the text caches when the step computes no text token (read, never written). Returns
    ``[B, H, S, d]``: this rank's computed tokens' outputs; with ``fresh_text`` also the
    exchanged keys and values of the computed text tokens (a step refreshing the text caches).
    No mask: the order of the keys does not matter.
    """
    w = world_size
    qx, kx, vx = _scatter_qkv(query, key, value, group_name, w)
    k = idx.shape[1] // w
    keys = cached_rows(cache_k, _rank_rows(kx, w, offset, k), idx, prev_k, ratio)
    values = cached_rows(cache_v, _rank_rows(vx, w, offset, k), idx, prev_v, ratio)
    if text_k is not None:
        texts = [cache if prev is None else extrapolate(cache, prev, text_ratio, qx.dtype)
                 for cache, prev in ((text_k, text_prev_k), (text_v, text_prev_v))]
    else:
        texts = [_rank_rows(t, w, offset, k, rest=True) for t in (kx, vx)]
    out = torch.nn.functional.scaled_dot_product_attention(
        qx, torch.cat([texts[0].to(qx.dtype), keys.to(qx.dtype)], dim=2),
        torch.cat([texts[1].to(qx.dtype), values.to(qx.dtype)], dim=2),
        dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    out = _gather_heads(out, group_name, w)
    return (out, texts[0], texts[1]) if fresh_text else out


def global_index(idx: torch.Tensor, n_local: int, group_name: str, world_size: int) -> torch.Tensor:
    """Every rank's token index ``[B, k]`` (positions among its ``n_local`` tokens) as
    positions in the rank-major order of all ranks' tokens: ``[B, W*k]``."""
    k = idx.shape[1]
    every = gather_shards(idx, 1, group_name, world_size)
    shift = torch.arange(world_size, device=idx.device).repeat_interleave(k) * n_local
    return every + shift


def gather_shards(x: torch.Tensor, dim: int, group_name: str, world_size: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (diffusers' gather of a
    context-parallel output)."""
    out = torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), world_size, group_name)
    out = torch.ops._c10d_functional.wait_tensor(out)
    return torch.cat(torch.chunk(out, world_size, dim=0), dim=dim)


# -- linears of a few rows (CPU) -----------------------------------------------------------
# A DiT's modulation (adaLN) linears take one row per sample, ``[B, D] x [D, 6D]``, on every
# call whatever the number of tokens computed: on a cached call they read as many weight bytes
# as on a full one. At 2-8 rows BLAS's ``x W^T`` streams the weight 1.4-4.7x slower than
# ``W x^T`` does on some CPUs and faster on others (BENCHMARKS.md, "A cached step's modulation
# linears", "The history blend's OpenMP regions"): the pass measures which. Registered as
# an opaque op: written as plain ``addmm``, Inductor would fuse the transposing copy of the result
# into the per-token kernels that read it, which then load the modulation strided.


@torch.library.custom_op("specdiff::few_row_linear", mutates_args=())
def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an ``x`` of a few rows, as ``(W x^T + b)^T``; one row is
    computed as two (BLAS's matrix-vector path streams the weight as slowly as ``x W^T``)."""
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:
        x2 = torch.cat([x2, x2])
    out = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, x2.t())
    return out[:, :rows].t().contiguous().reshape(*x.shape[:-1], weight.shape[0])


@few_row_linear.register_fake
def _few_row_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
