"""Subset variant: each attention's subset queries attend to all tokens via K/V caches.

Reads: ``plan.attention``, the ``Role.IDX`` input added by :func:`gather_token_subset`
(must run first), ``ctx.key`` (context mode, K/V extrapolation).
Writes: per attention call ``i`` two new inputs ``Role.KV`` ``specdiff_k{i}`` /
``specdiff_v{i}`` (``[B, H, N, d]``, the image-token keys/values of the last step that
computed them); the SDPA's key/value become :func:`specdiff_fx.ops.attend_keys`: the fresh
keys of the ``k`` computed tokens are scattered into the cache *in place* (so the cache
holds the newest keys afterwards) and the attention sees text + all ``N`` image keys, in
the model's own order.
With ``key.extrapolate`` it also adds ``Role.KV_RATIO`` ``specdiff_kv_ratio`` (``[B, N]``,
once) and per attention ``Role.KV_PREV`` ``specdiff_kp{i}`` / ``specdiff_vp{i}`` (each
token's keys/values from the computation before the cached one): the cached keys are
extrapolated to first order in sigma before the attention reads them, and both caches
shift in place for the computed tokens (see :func:`specdiff_fx.ops.attend_keys`).
With ``ContextMode.CACHED`` the subset graph has no text tokens (see
:func:`gather_token_subset`): per attention ``Role.TEXT_KV`` ``specdiff_kt{i}`` /
``specdiff_vt{i}`` (``[B, H, M, d]``, the text keys/values of their last computation) take
their place in the keys (with extrapolation also ``Role.TEXT_KV_PREV`` ``specdiff_ktp{i}`` /
``specdiff_vtp{i}`` and one ``Role.TEXT_RATIO`` ``specdiff_kv_ratio_txt`` ``[B]``); they are
read, never written.
With ``ContextMode.SUBSET`` the subset graph computes the ``k_txt`` text tokens at
``Role.TEXT_IDX`` (see :func:`gather_token_subset`): the same ``Role.TEXT_KV`` (and, with
extrapolation, ``Role.TEXT_KV_PREV``) inputs, but *written in place* at the text index like the
image caches (``NewInput.in_place``), the other text rows extrapolated with one ratio per text
token, ``Role.TEXT_TOKEN_RATIO`` ``specdiff_kv_ratio_txt_tokens`` ``[B, M]``; the attention
sees all ``M`` text and ``N`` image keys in the model's order.
With ``ContextMode.REFRESH`` the subset graph computes every text token (as with
``COMPUTE``) and also returns their fresh keys/values as extras ``Role.TEXT_KV`` ``kt{i}`` /
``vt{i}`` (``[B, H, M, d]``, like the full variant's), so a cached step can refresh the text
K/V caches.
Every cache input has the dtype ``config.kv_cache_dtype`` gives for the keys' (``kv_dtype``):
a narrower one is widened where the caches are read (see :func:`specdiff_fx.ops.cached_rows`);
the ratios are float32.
An attention mask gets back its columns for every key (:func:`gather_token_subset` cut
them to the subset's keys; ``ctx.memo["mask_rows"]``).
Under context parallelism (an attention is :func:`specdiff_fx.ops.ulysses_attention`) the
caches are in the layout after the exchange (:func:`expose_attention_kv`): ``Role.KV`` and
``Role.KV_PREV`` are ``[B, H/W, W*N, d]``, ``Role.TEXT_KV`` ``[B, H/W, W*M, d]``; the index
and the per-token ratio are gathered from every rank once per call
(:func:`specdiff_fx.ops.global_index`, :func:`specdiff_fx.ops.gather_shards`), and each
attention becomes :func:`specdiff_fx.ops.ulysses_attend_cached`: only the computed tokens'
queries, keys and values go through the exchange. The replaced node stays, unused, until the
dead-code removal after the last pass. No text subset (``ContextMode.SUBSET``) there.
Keeps true: queries are only the computed tokens; the attention output has the query's
layout; with ``idx`` = all tokens (and, for a text subset, the text index = all text tokens)
the result equals the full graph's.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name, set_operand
from ..layout import node_shape, sdpa_args
from ..signature import ContextMode, Port, Role
from .context import RewriteContext


def _text_kwargs(gm: fx.GraphModule, ctx: RewriteContext, i: int, t: str, shape: tuple[int, ...], val,
                 text_ratio: fx.Node | None) -> dict:
    """The text caches of attention ``i``'s keys (``t="k"``) or values (``"v"``), read
    from caches (``CACHED``) or written at the text index (``SUBSET``)."""
    in_place = ctx.context is ContextMode.SUBSET
    dtype = ctx.config.kv_cache_dtype(val.dtype)
    kwargs = {"text": ctx.add_input(gm, Port(Role.TEXT_KV, i, t), shape, dtype, val.device, in_place=in_place)}
    if text_ratio is not None:
        kwargs.update(text_prev=ctx.add_input(gm, Port(Role.TEXT_KV_PREV, i, t), shape, dtype, val.device,
                                              in_place=in_place), text_ratio=text_ratio)
    if in_place:
        kwargs.update(text_idx=ctx.memo["text_idx"])
    return kwargs


def _ulysses(gm: fx.GraphModule, ctx: RewriteContext, ratio: fx.Node | None, text_ratio: fx.Node | None) -> None:
    """The context-parallel form: each ``ulysses_attention`` -> ``ulysses_attend_cached``
    with caches in the exchanged layout (see the module docstring)."""
    plan, key = ctx.plan, ctx.key
    group, world, _ = plan.parallel
    nodes = nodes_by_name(gm)
    n = plan.num_image_tokens
    first = nodes[plan.attention[0].node]
    with gm.graph.inserting_before(first):
        idx = gm.graph.call_function(ops.global_index, (ctx.memo["idx"], n, group, world))
        if ratio is not None:
            ratio = gm.graph.call_function(ops.gather_shards, (ratio, 1, group, world))
    for i, site in enumerate(plan.attention):
        sdpa = nodes[site.node]
        args = sdpa_args(sdpa)
        val = args["key"].meta["val"]
        b, h, _, d = val.shape
        shape = (b, h // world, world * n, d)
        dtype = ctx.config.kv_cache_dtype(val.dtype)
        kwargs = {}
        for t in ("k", "v"):
            kwargs[f"cache_{t}"] = ctx.add_input(gm, Port(Role.KV, i, t), shape, dtype, val.device)
            if ratio is not None:
                kwargs[f"prev_{t}"] = ctx.add_input(gm, Port(Role.KV_PREV, i, t), shape, dtype, val.device)
        if ratio is not None:
            kwargs["ratio"] = ratio
        offset = site.img_offset
        m = site.layout.length - n
        if key.context is ContextMode.CACHED and m:
            for t in ("k", "v"):
                text = _text_kwargs(gm, ctx, i, t, (b, h // world, world * m, d), val, text_ratio)
                kwargs[f"text_{t}"] = text["text"]
                if "text_prev" in text:
                    kwargs.update({f"text_prev_{t}": text["text_prev"], "text_ratio": text_ratio})
            offset = site.layout.to_sub(offset, ctx.k, 0)
        refresh = key.context is ContextMode.REFRESH and bool(m)
        kwargs.update(fresh_text=refresh, dropout_p=args.get("dropout_p", 0.0), is_causal=args.get("is_causal", False),
                      scale=args.get("scale"), group_name=group, world_size=world)
        with gm.graph.inserting_after(sdpa):
            attended = gm.graph.call_function(
                ops.ulysses_attend_cached, (args["query"], args["key"], args["value"], idx, offset), kwargs)
        out = attended
        if refresh:  # the fresh text K/V, for the runtime's text caches
            with gm.graph.inserting_after(attended):
                out, *texts = [gm.graph.call_function(operator.getitem, (attended, j)) for j in range(3)]
            texts = [ctx.cache_kv(gm, node, val.dtype) for node in texts]
            ctx.extras.update(zip((Port(Role.TEXT_KV, i, "k"), Port(Role.TEXT_KV, i, "v")), texts))
        sdpa.replace_all_uses_with(out)


def attend_with_kv_cache(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    plan = ctx.plan
    idx = ctx.memo["idx"]
    nodes = nodes_by_name(gm)
    key = ctx.key
    ratio = text_ratio = None
    text_cached = key.context in (ContextMode.CACHED, ContextMode.SUBSET)
    first = sdpa_args(nodes[plan.attention[0].node])["key"].meta["val"]
    if key.extrapolate:  # the ratios are float32 whatever the keys' dtype (ops.extrapolate casts them)
        ratio = ctx.add_input(gm, Port(Role.KV_RATIO), (plan.batch, plan.num_image_tokens), torch.float32,
                              first.device)
        if key.context is ContextMode.CACHED:
            text_ratio = ctx.add_input(gm, Port(Role.TEXT_RATIO), (plan.batch,), torch.float32, first.device)
        elif key.context is ContextMode.SUBSET:
            text_ratio = ctx.add_input(gm, Port(Role.TEXT_TOKEN_RATIO), (plan.batch, plan.num_text_tokens),
                                       torch.float32, first.device)
    if plan.parallel is not None:
        _ulysses(gm, ctx, ratio, text_ratio)
        return gm
    for i, site in enumerate(plan.attention):
        sdpa = nodes[site.node]
        args = sdpa_args(sdpa)
        new = {}
        for name in ("key", "value"):
            t = name[0]
            fresh = args[name]
            val = fresh.meta["val"]
            shape = (plan.batch, node_shape(fresh)[1], plan.num_image_tokens, node_shape(fresh)[3])
            dtype = ctx.config.kv_cache_dtype(val.dtype)
            cache = ctx.add_input(gm, Port(Role.KV, i, t), shape, dtype, val.device)
            kwargs = {}
            if ratio is not None:
                kwargs.update(prev=ctx.add_input(gm, Port(Role.KV_PREV, i, t), shape, dtype, val.device),
                              ratio=ratio)
            offset = site.img_offset
            m = site.layout.length - plan.num_image_tokens
            if text_cached and m:
                kwargs.update(_text_kwargs(gm, ctx, i, t, (*shape[:2], m, shape[3]), val, text_ratio),
                              text_offset=offset)
                # where the image segment starts among the computed tokens: after the text subset
                # before it (none with the context cached: the subset's sequence is its image tokens)
                offset = site.layout.to_sub(offset, ctx.k, key.k_txt or 0)
            with gm.graph.inserting_before(sdpa):
                new[name] = gm.graph.call_function(ops.attend_keys, (cache, fresh, idx, offset), kwargs)
                if key.context is ContextMode.REFRESH and m:  # the fresh text K/V, for the runtime's text caches
                    ctx.extras[Port(Role.TEXT_KV, i, t)] = ctx.cache_kv(gm, gm.graph.call_function(
                        ops.text_segment, (fresh, 2, offset, ctx.k)), val.dtype)
        positional = ["query", "key", "value"]
        sdpa.args = tuple(new.get(positional[j], a) if j < 3 else a for j, a in enumerate(sdpa.args))
        sdpa.kwargs = {name: new.get(name, a) for name, a in sdpa.kwargs.items()}
        if site.node in ctx.memo.get("mask_rows", {}):  # the keys are whole again: so are the mask's columns
            set_operand(sdpa, *ctx.memo["mask_rows"][site.node])
    return gm
