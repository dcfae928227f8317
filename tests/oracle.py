"""Independent eager reference ("oracle") for token-level feature caching in DiTs.

``specdiff_fx`` rewrites a diffusion transformer so that, on a cached step, only a
subset of the image tokens is recomputed while the attention of those tokens still
sees every image token through cached keys/values. This module computes, in plain
eager PyTorch and with deliberately simple, model-specific code, what such a step
*should* produce, so tests can compare the backend against it. It shares no code
with ``specdiff_fx``.

Supported models: ``diffusers.SD3Transformer2DModel`` (SD3 and SD3.5-style configs,
i.e. ``qk_norm="rms_norm"`` and ``dual_attention_layers``) and
``diffusers.FluxTransformer2DModel`` (double- and single-stream blocks).

Vocabulary
----------
* **image tokens**: the ``N`` tokens of the patch-embedded latent (SD3: output of
  ``pos_embed``; FLUX: output of ``x_embedder``). **text tokens**: the ``T`` context
  tokens (output of ``context_embedder``), always computed.
* **attention calls**: every scaled-dot-product attention run by ``forward``, in
  execution order. SD3: the joint ``attn`` of each block, followed (in dual-attention
  blocks) by the image-only ``attn2`` of that block. FLUX: one per double-stream
  block, then one per single-stream block.
* **image K/V** of a call: the keys/values of the image tokens exactly as fed to the
  attention (after qk-norm and, for FLUX, after RoPE), each ``[B, H, N, d]``.
* **score**: attention *received* by each image token: for each call
  ``P = softmax(q kᵀ / sqrt(d))`` of shape ``[B, H, S_q, S_k]``;
  ``P.mean(heads).sum(queries)`` gives ``[B, S_k]``; keep the image positions and sum
  over calls -> ``[B, N]``.

Public API
----------
* :func:`full_reference` -- every token computed; returns :class:`FullRef`.
* :func:`sparse_reference` -- only ``idx[b]`` image tokens (plus all text tokens, or
  only ``text_idx[b]`` of them) computed against cached image (and text) K/V; returns
  :class:`SparseRef`.
* :func:`unpatchify` -- per-token output -> what ``model(**inputs).sample`` holds.
* :func:`num_attention_calls`, :func:`num_image_tokens`.
* Tiny models and inputs: :func:`tiny_sd3`, :func:`tiny_flux`, :func:`sd3_inputs`,
  :func:`flux_inputs`.

Conventions
-----------
* The input builders return forward kwargs *without* ``return_dict``, so
  ``model(**inputs).sample`` works. The oracle functions accept kwargs with or without
  ``return_dict`` and ignore it (they always run the model with ``return_dict=False``).
* The oracle runs under ``torch.no_grad()``, never mutates ``inputs`` or the given
  caches, and always restores the model's attention processors (also on error).
* Attention is evaluated explicitly (``softmax(q kᵀ · scale) @ v``) in at least
  float32, so the output of :func:`full_reference` equals the model's own output up to
  float rounding (~1e-6), not bit-exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor

__all__ = [
    "KV",
    "FullRef",
    "SparseRef",
    "full_reference",
    "sparse_reference",
    "unpatchify",
    "num_attention_calls",
    "num_image_tokens",
    "tiny_sd3",
    "tiny_flux",
    "sd3_inputs",
    "flux_inputs",
]

KV = tuple[Tensor, Tensor]
"""(K_img, V_img) of one attention call, each ``[B, H, N, d]``."""

Model = SD3Transformer2DModel | FluxTransformer2DModel


@dataclass(frozen=True)
class FullRef:
    """Result of :func:`full_reference` (every token computed).

    Attributes:
        out_tokens: ``[B, N, C_out]`` per-image-token output before unpatchify (SD3: the
            ``proj_out`` output, ``C_out = patch² · out_channels``; FLUX: the model output).
        kv: one ``(K_img, V_img)`` per attention call, in execution order, each
            ``[B, H, N, d]``.
        score: ``[B, N]`` attention received by each image token, summed over calls.
        text_kv: one ``(K_txt, V_txt)`` per attention call with text tokens, each
            ``[B, H, M, d]`` (as fed to the attention: after qk-norm and RoPE).
    """

    out_tokens: Tensor
    kv: list[KV]
    score: Tensor
    text_kv: list[KV] = field(default_factory=list)


@dataclass(frozen=True)
class SparseRef:
    """Result of :func:`sparse_reference` (only ``idx`` image tokens computed).

    Attributes:
        out_tokens: ``[B, k, C_out]`` outputs of the computed image tokens, in ``idx`` order.
        kv: updated caches, one ``(K_full, V_full)`` per attention call, each
            ``[B, H, N, d]``: the given cache with the fresh K/V written at ``idx[b]``.
        score: ``[B, N]`` attention received by each image token from the computed
            queries only (subset image + text tokens), keys = all tokens, summed over calls.
        text_kv: one ``(K_txt, V_txt)`` per attention call with text, each ``[B, H, M, d]``:
            with a text subset (``text_idx``) the given text caches with the fresh text K/V
            written at ``text_idx[b]``; else the text K/V the step computed (all text tokens).
    """

    out_tokens: Tensor
    kv: list[KV]
    score: Tensor
    text_kv: list[KV] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Shared per-forward state: cache merge, explicit attention, score accumulation
# --------------------------------------------------------------------------------------


class _Recorder:
    """State shared by the oracle attention processors during one forward pass.

    Attention calls are identified by their execution order (the ``i``-th call reads
    ``cache[i]``), which is exactly how the caches returned by the oracle are ordered.
    """

    def __init__(self, num_image: int, idx: Tensor | None = None, cache: Sequence[KV] | None = None,
                 text_cache: Sequence[KV] | None = None, text_idx: Tensor | None = None) -> None:
        self.num_image = num_image
        self.idx = idx  # [B, k] or None (full mode)
        self.cache = cache
        self.text_cache = text_cache  # context caching: the text K/V every attention reads
        self.text_idx = text_idx  # text subset [B, k_txt]: only these text rows are fresh
        self.kv: list[KV] = []
        self.text_kv: list[KV] = []
        self.score: Tensor | None = None

    def text(self, k_txt: Tensor, v_txt: Tensor) -> KV:
        """Record the text K/V of this attention call; return the cached ones if given."""
        call = len(self.text_kv)
        if self.text_idx is not None:  # text subset: fresh rows at text_idx, the cache elsewhere
            k_full = self.text_cache[call][0].to(dtype=k_txt.dtype, copy=True)
            v_full = self.text_cache[call][1].to(dtype=v_txt.dtype, copy=True)
            for b in range(k_txt.shape[0]):
                k_full[b, :, self.text_idx[b]] = k_txt[b]
                v_full[b, :, self.text_idx[b]] = v_txt[b]
            self.text_kv.append((k_full, v_full))
            return k_full, v_full
        self.text_kv.append((k_txt, v_txt))
        if self.text_cache is None:
            return k_txt, v_txt
        k_c, v_c = self.text_cache[call]
        return k_c.to(k_txt.dtype), v_c.to(v_txt.dtype)

    def image_kv(self, k_img: Tensor, v_img: Tensor) -> KV:
        """Turn the fresh image K/V of the computed tokens ``[B, H, n, d]`` into the
        K/V of all ``N`` image tokens, record it, and return it."""
        call = len(self.kv)
        if self.idx is None:
            if k_img.shape[2] != self.num_image:
                raise AssertionError(f"full mode expects {self.num_image} image tokens, got {k_img.shape[2]}")
            k_full, v_full = k_img, v_img
        else:
            assert self.cache is not None
            if call >= len(self.cache):
                raise ValueError(f"the model runs more attention calls than the {len(self.cache)} given caches")
            k_cache, v_cache = self.cache[call]
            batch, heads, _, head_dim = k_img.shape
            expected = (batch, heads, self.num_image, head_dim)
            if tuple(k_cache.shape) != expected or tuple(v_cache.shape) != expected:
                raise ValueError(
                    f"cache of attention call {call} has shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)}, "
                    f"expected {expected}"
                )
            k_full = k_cache.to(device=k_img.device, dtype=k_img.dtype, copy=True)
            v_full = v_cache.to(device=v_img.device, dtype=v_img.dtype, copy=True)
            for b in range(batch):
                k_full[b, :, self.idx[b]] = k_img[b]
                v_full[b, :, self.idx[b]] = v_img[b]
        self.kv.append((k_full, v_full))
        return k_full, v_full

    def attend(self, q: Tensor, k: Tensor, v: Tensor, image_keys: slice) -> Tensor:
        """``softmax(q kᵀ / sqrt(d)) @ v`` for ``[B, H, S, d]`` tensors; adds the attention
        received by the key positions ``image_keys`` (the image tokens) to the score."""
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        scale = 1.0 / math.sqrt(q.shape[-1])
        logits = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * scale
        probs = logits.softmax(dim=-1)  # [B, H, S_q, S_k]
        out = (probs @ v.to(compute_dtype)).to(q.dtype)
        received = probs.mean(dim=1).sum(dim=1)[:, image_keys]  # [B, N]
        if received.shape[1] != self.num_image:
            raise AssertionError(f"score covers {received.shape[1]} keys, expected {self.num_image}")
        self.score = received if self.score is None else self.score + received
        return out


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, S, H*d] -> [B, H, S, d]``."""
    batch, seq, inner = x.shape
    return x.view(batch, seq, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """``[B, H, S, d] -> [B, S, H*d]``."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


# --------------------------------------------------------------------------------------
# Attention processors (same maths as diffusers' JointAttnProcessor2_0 / FluxAttnProcessor)
# --------------------------------------------------------------------------------------


class _SD3Processor:
    """Replacement for ``JointAttnProcessor2_0``: joint attention (``attn``, image first
    then text) or image-only self-attention (``attn2``, ``encoder_hidden_states=None``)."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise NotImplementedError("the oracle does not support attention masks")
        heads = attn.heads
        num_img = hidden_states.shape[1]

        q = _split_heads(attn.to_q(hidden_states), heads)
        k = _split_heads(attn.to_k(hidden_states), heads)
        v = _split_heads(attn.to_v(hidden_states), heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        k_img, v_img = self.recorder.image_kv(k, v)  # all N image tokens
        keys, values = k_img, v_img
        if encoder_hidden_states is not None:
            q_txt = _split_heads(attn.add_q_proj(encoder_hidden_states), heads)
            k_txt = _split_heads(attn.add_k_proj(encoder_hidden_states), heads)
            v_txt = _split_heads(attn.add_v_proj(encoder_hidden_states), heads)
            if attn.norm_added_q is not None:
                q_txt = attn.norm_added_q(q_txt)
            if attn.norm_added_k is not None:
                k_txt = attn.norm_added_k(k_txt)
            k_txt, v_txt = self.recorder.text(k_txt, v_txt)
            q = torch.cat([q, q_txt], dim=2)
            keys = torch.cat([k_img, k_txt], dim=2)
            values = torch.cat([v_img, v_txt], dim=2)

        out = _merge_heads(self.recorder.attend(q, keys, values, image_keys=slice(0, self.recorder.num_image)))
        img_out, txt_out = out[:, :num_img], out[:, num_img:]
        img_out = attn.to_out[1](attn.to_out[0](img_out))
        if encoder_hidden_states is None:
            return img_out
        if not attn.context_pre_only:
            txt_out = attn.to_add_out(txt_out)
        return img_out, txt_out


class _FluxProcessor:
    """Replacement for ``FluxAttnProcessor``: the sequence is text first (``text_len``
    tokens), then image. Double-stream blocks pass text as ``encoder_hidden_states``;
    single-stream blocks pass the concatenated sequence as ``hidden_states``."""

    def __init__(self, recorder: _Recorder, text_len: int) -> None:
        self.recorder = recorder
        self.text_len = text_len

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise NotImplementedError("the oracle does not support attention masks")
        # [B, S, H, d] layout, as in diffusers.
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        v = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None:
            q_txt = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            k_txt = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            v_txt = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            q = torch.cat([q_txt, q], dim=1)
            k = torch.cat([k_txt, k], dim=1)
            v = torch.cat([v_txt, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, d]

        t_len = self.text_len
        k_img, v_img = self.recorder.image_kv(k[:, :, t_len:], v[:, :, t_len:])
        k_txt, v_txt = self.recorder.text(k[:, :, :t_len], v[:, :, :t_len])
        keys = torch.cat([k_txt, k_img], dim=2)
        values = torch.cat([v_txt, v_img], dim=2)
        image_keys = slice(k_txt.shape[2], k_txt.shape[2] + self.recorder.num_image)  # all M text keys first
        out = _merge_heads(self.recorder.attend(q, keys, values, image_keys=image_keys))

        if encoder_hidden_states is None:
            return out  # single-stream block: no output projection inside attention
        txt_out, img_out = out[:, :t_len], out[:, t_len:]
        img_out = attn.to_out[1](attn.to_out[0](img_out))
        txt_out = attn.to_add_out(txt_out)
        return img_out, txt_out


@contextlib.contextmanager
def _swapped_processors(model: torch.nn.Module, processor: Callable[..., Any]) -> Iterator[None]:
    """Install ``processor`` on every attention module of ``model``; restore the
    original processors (per module) on exit, also on error."""
    attention_modules = [
        m for m in model.modules() if callable(getattr(m, "set_processor", None)) and hasattr(m, "processor")
    ]
    originals = [(m, m.processor) for m in attention_modules]
    try:
        for m in attention_modules:
            m.set_processor(processor)
        yield
    finally:
        for m, original in originals:
            m.set_processor(original)


# --------------------------------------------------------------------------------------
# Helpers on models and inputs
# --------------------------------------------------------------------------------------


def _kind(model: torch.nn.Module) -> str:
    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    if isinstance(model, FluxTransformer2DModel):
        return "flux"
    raise TypeError(f"unsupported model type {type(model).__name__}")


_SUPPORTED_KEYS = {
    "sd3": {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "return_dict"},
    "flux": {
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
        "return_dict",
    },
}


def _clean_inputs(model: torch.nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow copy of ``inputs`` without ``return_dict`` and ``None`` values; rejects
    kwargs the oracle does not model (controlnet residuals, skip_layers, ...)."""
    kind = _kind(model)
    unsupported = {k for k, v in inputs.items() if v is not None and k not in _SUPPORTED_KEYS[kind]}
    if unsupported:
        raise NotImplementedError(f"the oracle does not support the forward kwargs {sorted(unsupported)}")
    return {k: v for k, v in inputs.items() if k != "return_dict" and v is not None}


def num_image_tokens(model: Model, inputs: Mapping[str, Any]) -> int:
    """``N``: number of image tokens of a forward with these kwargs."""
    hidden_states = inputs["hidden_states"]
    if _kind(model) == "sd3":
        patch = model.config.patch_size
        return (hidden_states.shape[-2] // patch) * (hidden_states.shape[-1] // patch)
    return hidden_states.shape[1]


def num_attention_calls(model: Model) -> int:
    """Number of attention calls of one forward (= length of the ``kv`` lists)."""
    if _kind(model) == "sd3":
        return sum(2 if block.attn2 is not None else 1 for block in model.transformer_blocks)
    return len(model.transformer_blocks) + len(model.single_transformer_blocks)


def unpatchify(model: Model, out_tokens: Tensor, inputs: Mapping[str, Any]) -> Tensor:
    """Per-image-token output ``[B, N, C_out]`` -> the tensor ``model(**inputs).sample``
    holds (SD3: ``[B, out_channels, H, W]``; FLUX: unchanged ``[B, N, C]``)."""
    if _kind(model) == "flux":
        return out_tokens
    patch = model.config.patch_size
    height, width = inputs["hidden_states"].shape[-2:]
    h, w = height // patch, width // patch
    x = out_tokens.reshape(out_tokens.shape[0], h, w, patch, patch, model.out_channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q
    return x.reshape(out_tokens.shape[0], model.out_channels, h * patch, w * patch)


def _batch_size(inputs: Mapping[str, Any]) -> int:
    return int(inputs["hidden_states"].shape[0])


def _slice_sample(inputs: Mapping[str, Any], b: int, batch: int) -> dict[str, Any]:
    """Kwargs of sample ``b`` alone (batch-dimension tensors sliced to ``b:b+1``;
    position ids and broadcast tensors left as they are)."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        per_sample = key not in ("img_ids", "txt_ids")
        if per_sample and isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            out[key] = value[b : b + 1]
        else:
            out[key] = value
    return out


def _validate_idx(idx: Tensor, batch: int, num_image: int) -> None:
    if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.ndim != 2:
        raise ValueError("idx must be a LongTensor of shape [B, k]")
    if idx.shape[0] != batch:
        raise ValueError(f"idx has batch size {idx.shape[0]}, inputs have {batch}")
    if idx.shape[1] < 1 or idx.shape[1] > num_image:
        raise ValueError(f"idx must select between 1 and {num_image} tokens per sample, got {idx.shape[1]}")
    if bool((idx < 0).any()) or bool((idx >= num_image).any()):
        raise ValueError(f"idx values must lie in [0, {num_image})")
    for b in range(batch):
        if torch.unique(idx[b]).numel() != idx.shape[1]:
            raise ValueError(f"idx[{b}] contains duplicate token indices")


# --------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------


@torch.no_grad()
def full_reference(model: Model, inputs: Mapping[str, Any]) -> FullRef:
    """Run the model's own ``forward`` with every token computed, recording the image
    K/V of every attention call and the received-attention score.

    Args:
        model: an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (eval mode).
        inputs: its forward kwargs (``return_dict`` is ignored).
    """
    kwargs = _clean_inputs(model, inputs)
    recorder = _Recorder(num_image_tokens(model, kwargs))
    if _kind(model) == "sd3":
        captured: list[Tensor] = []
        hook = model.proj_out.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with _swapped_processors(model, _SD3Processor(recorder)):
                model(**kwargs, return_dict=False)
        finally:
            hook.remove()
        (out_tokens,) = captured
    else:
        text_len = kwargs["encoder_hidden_states"].shape[1]
        with _swapped_processors(model, _FluxProcessor(recorder, text_len)):
            out_tokens = model(**kwargs, return_dict=False)[0]
    assert recorder.score is not None and len(recorder.kv) == num_attention_calls(model)
    return FullRef(out_tokens=out_tokens, kv=recorder.kv, score=recorder.score, text_kv=recorder.text_kv)


@torch.no_grad()
def sparse_reference(model: Model, inputs: Mapping[str, Any], idx: Tensor, kv: Sequence[KV],
                     text_kv: Sequence[KV] | None = None, text_idx: Tensor | None = None) -> SparseRef:
    """Recompute only the image tokens ``idx[b]`` of each sample ``b`` (plus every text
    token) against cached image K/V.

    Every block runs on ``[the k selected image tokens + all text tokens]``. At each
    attention call the queries are the computed tokens (in the model's own order: SD3
    image then text, FLUX text then image); the keys/values are all ``N`` image tokens
    plus the text tokens, where the image part is ``kv[call]`` with the subset's fresh
    K/V written at ``idx[b]``. FLUX RoPE uses the subset's own positions
    ``img_ids[idx[b]]``.

    Args:
        model: an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (eval mode).
        inputs: the forward kwargs of the full step (``return_dict`` is ignored).
        idx: ``[B, k]`` LongTensor of distinct image-token indices per sample.
        kv: one ``(K_img, V_img)`` per attention call, each ``[B, H, N, d]`` (e.g.
            :attr:`FullRef.kv` of an earlier step). Not mutated.
        text_kv: context caching: one ``(K_txt, V_txt)`` per attention call with text,
            each ``[B, H, M, d]``, used in place of the text tokens' own K/V (the text
            tokens are still run, but nothing of theirs reaches the image tokens).
        text_idx: text subset (with ``text_kv``): ``[B, k_txt]`` distinct text positions per
            sample; only these text tokens are run (FLUX: with ``txt_ids[text_idx[b]]``), and each
            attention sees their fresh K/V at those rows of ``text_kv``, the cached K/V elsewhere.
    """
    kwargs = _clean_inputs(model, inputs)
    batch = _batch_size(kwargs)
    num_image = num_image_tokens(model, kwargs)
    _validate_idx(idx, batch, num_image)
    if len(kv) != num_attention_calls(model):
        raise ValueError(f"kv has {len(kv)} entries, the model runs {num_attention_calls(model)} attention calls")
    idx = idx.to(kwargs["hidden_states"].device)
    if text_idx is not None and text_kv is None:
        raise ValueError("a text subset (text_idx) reads the other text tokens' K/V from text_kv")
    if _kind(model) == "sd3":
        return _sparse_sd3(model, kwargs, idx, kv, text_kv, text_idx)
    return _sparse_flux(model, kwargs, idx, kv, text_kv, text_idx)


def _sparse_sd3(model: SD3Transformer2DModel, kwargs: dict[str, Any], idx: Tensor, kv: Sequence[KV],
                text_kv: Sequence[KV] | None, text_idx: Tensor | None = None) -> SparseRef:
    """SD3 forward restricted to the image tokens ``idx`` (whole batch at once)."""
    batch = _batch_size(kwargs)
    image = model.pos_embed(kwargs["hidden_states"])  # [B, N, D], patch embed + pos embed
    temb = model.time_text_embed(kwargs["timestep"], kwargs["pooled_projections"])
    text = model.context_embedder(kwargs["encoder_hidden_states"])
    image = torch.stack([image[b, idx[b]] for b in range(batch)])  # [B, k, D]
    if text_idx is not None:
        text = torch.stack([text[b, text_idx[b]] for b in range(batch)])  # [B, k_txt, D]

    recorder = _Recorder(num_image_tokens(model, kwargs), idx, kv, text_kv, text_idx)
    with _swapped_processors(model, _SD3Processor(recorder)):
        for block in model.transformer_blocks:
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb)
    out_tokens = model.proj_out(model.norm_out(image, temb))

    if len(recorder.kv) != len(kv):
        raise ValueError(f"the model ran {len(recorder.kv)} attention calls, {len(kv)} caches given")
    assert recorder.score is not None
    return SparseRef(out_tokens=out_tokens, kv=recorder.kv, score=recorder.score, text_kv=recorder.text_kv)


def _sparse_flux(model: FluxTransformer2DModel, kwargs: dict[str, Any], idx: Tensor, kv: Sequence[KV],
                 text_kv: Sequence[KV] | None, text_idx: Tensor | None = None) -> SparseRef:
    """FLUX: the model's own forward, one sample at a time, on ``hidden_states[:, idx[b]]``
    with ``img_ids[idx[b]]`` and the cached-K/V processor."""
    batch = _batch_size(kwargs)
    num_image = num_image_tokens(model, kwargs)
    img_ids = kwargs["img_ids"]
    if img_ids.ndim == 3:  # deprecated batched ids: diffusers uses the first row
        img_ids = img_ids[0]
    text_len = kwargs["encoder_hidden_states"].shape[1] if text_idx is None else text_idx.shape[1]
    txt_ids = kwargs["txt_ids"][0] if kwargs["txt_ids"].ndim == 3 else kwargs["txt_ids"]

    outs: list[Tensor] = []
    scores: list[Tensor] = []
    per_sample_kv: list[list[KV]] = []
    per_sample_text: list[list[KV]] = []
    for b in range(batch):
        sample = _slice_sample(kwargs, b, batch)
        sample["hidden_states"] = kwargs["hidden_states"][b : b + 1, idx[b]]
        sample["img_ids"] = img_ids[idx[b]]
        if text_idx is not None:
            sample["encoder_hidden_states"] = kwargs["encoder_hidden_states"][b : b + 1, text_idx[b]]
            sample["txt_ids"] = txt_ids[text_idx[b]]
        cache_b = [(k[b : b + 1], v[b : b + 1]) for k, v in kv]
        text_b = None if text_kv is None else [(k[b : b + 1], v[b : b + 1]) for k, v in text_kv]
        text_idx_b = None if text_idx is None else text_idx[b : b + 1]
        recorder = _Recorder(num_image, idx[b : b + 1], cache_b, text_b, text_idx_b)
        with _swapped_processors(model, _FluxProcessor(recorder, text_len)):
            outs.append(model(**sample, return_dict=False)[0])
        if len(recorder.kv) != len(kv):
            raise ValueError(f"the model ran {len(recorder.kv)} attention calls, {len(kv)} caches given")
        assert recorder.score is not None
        scores.append(recorder.score)
        per_sample_kv.append(recorder.kv)
        per_sample_text.append(recorder.text_kv)

    def cat_samples(per_sample: list[list[KV]]) -> list[KV]:
        return [(torch.cat([s[i][0] for s in per_sample]), torch.cat([s[i][1] for s in per_sample]))
                for i in range(len(per_sample[0]))]

    return SparseRef(out_tokens=torch.cat(outs), kv=cat_samples(per_sample_kv), score=torch.cat(scores),
                     text_kv=cat_samples(per_sample_text))


# --------------------------------------------------------------------------------------
# Tiny models and inputs (random weights, no hub access)
# --------------------------------------------------------------------------------------


def _randomize_norm_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give affine norm weights (initialised to ones) random values around 1, so a
    skipped or misplaced qk-norm changes the result."""
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight") and bool((param == 1).all()):
            param.data.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))


def tiny_sd3(seed: int = 0, *, sd35: bool = False) -> SD3Transformer2DModel:
    """Tiny random-weight SD3 transformer (eval, float32).

    hidden 16 = 2 heads × head dim 8, patch 2, in/out channels 4 (``C_out`` = 16),
    3 layers, joint_attention_dim 12, pooled 10, pos_embed_max_size 16 (latents up to
    32×32). ``sd35=True`` adds ``qk_norm="rms_norm"`` and a dual-attention block 0
    (4 attention calls instead of 3).
    """
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        pos_embed_max_size=16,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )
    _randomize_norm_weights(model, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    """Tiny random-weight FLUX transformer (eval, float32).

    hidden 16 = 2 heads × head dim 8, patch 1, in/out channels 4, 2 double + 2 single
    blocks (4 attention calls), joint_attention_dim 12, pooled 10, guidance embeds,
    RoPE axes (2, 2, 4).
    """
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )
    _randomize_norm_weights(model, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()


def sd3_inputs(batch: int, height: int, width: int, seed: int = 0) -> dict[str, Tensor]:
    """SD3 forward kwargs (no ``return_dict``): latent ``[B, 4, height, width]``, text
    ``[B, 5, 12]``, pooled ``[B, 10]``, timestep ``[B]`` in [400, 600)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, height, width, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
        "pooled_projections": torch.randn(batch, 10, generator=g),
        "timestep": 400.0 + 200.0 * torch.rand(batch, generator=g),
    }


def _flux_image_ids(h_tokens: int, w_tokens: int) -> Tensor:
    """Like ``FluxPipeline._prepare_latent_image_ids``: ``[h*w, 3]`` = (0, row, col)."""
    ids = torch.zeros(h_tokens, w_tokens, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h_tokens)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w_tokens)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)


def flux_inputs(batch: int, h_tokens: int, w_tokens: int, seed: int = 0, text_len: int = 5) -> dict[str, Tensor]:
    """FLUX forward kwargs (no ``return_dict``): packed latent ``[B, h*w, 4]``, text
    ``[B, text_len, 12]``, pooled ``[B, 10]``, timestep ``[B]`` in (0.1, 0.9),
    ``img_ids [h*w, 3]``, ``txt_ids`` zeros ``[text_len, 3]``, guidance ``[B]`` = 3.5."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, h_tokens * w_tokens, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, 12, generator=g),
        "pooled_projections": torch.randn(batch, 10, generator=g),
        "timestep": 0.1 + 0.8 * torch.rand(batch, generator=g),
        "img_ids": _flux_image_ids(h_tokens, w_tokens),
        "txt_ids": torch.zeros(text_len, 3),
        "guidance": torch.full((batch,), 3.5),
    }
