"""Tiny random-weight transformers of the newer DiT families, and their forward inputs.

Built from configs in code (nothing downloaded), float32, eval mode, seeded. Each builder
returns the model; each ``*_inputs`` function returns forward kwargs (without
``return_dict``) for a given batch and token grid, with the conventions of the family's
diffusers pipeline (timestep scale, position ids, masks).

* Chroma: 1 double + 1 single block, text mask with padding (``attention_mask``).
* FLUX.2: 1 double + 1 single block, 4-axis RoPE; ``refs`` appends reference-image tokens
  (time coordinate 10) to the image stream, as ``Flux2Pipeline`` does for editing.
* Qwen-Image: 2 blocks, text mask (``encoder_hidden_states_mask``), ``img_shapes``.
* FLUX.2 Klein KV (``flux2_kv``): the same model with the KV processors of
  ``Flux2KleinKVPipeline`` in ``kv_cache_mode="cached"``: the reference images' K/V come from
  a ``Flux2KVCache`` and are spliced into every attention's keys (never into its queries).
* Wan: 2 blocks (self-attention + cross-attention to text), video latent ``[B, C, F, H, W]``.
"""

from __future__ import annotations

import torch
from diffusers import (
    ChromaTransformer2DModel,
    Flux2Transformer2DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
)
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVCache,
    Flux2KVParallelSelfAttnProcessor,
)

TEXT = 5  # context tokens
TEXT_DIM = 12


def _ready(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values around 1 for affine norm weights (initialised to ones), so a skipped
    or misplaced norm changes the result; float32, eval."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight") and bool((param == 1).all()):
            param.data.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=g))
    return model.float().eval()


def tiny_chroma(seed: int = 0) -> ChromaTransformer2DModel:
    torch.manual_seed(seed)
    return _ready(ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1), seed)


def tiny_flux2(seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    return _ready(Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2)), seed)


def tiny_flux2_kv(seed: int = 0) -> Flux2Transformer2DModel:
    """``tiny_flux2`` with the processors ``Flux2KleinKVPipeline`` installs."""
    model = tiny_flux2(seed)
    for block in model.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def tiny_qwen(seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    return _ready(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4)), seed)


def tiny_wan(seed: int = 0, **config) -> WanTransformer3DModel:
    """``config`` overrides, e.g. the I2V config: ``image_dim``, ``added_kv_proj_dim``, ``in_channels``."""
    torch.manual_seed(seed)
    return _ready(WanTransformer3DModel(**{
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
        "out_channels": 4, "text_dim": TEXT_DIM, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2,
        "rope_max_seq_len": 32, **config}), seed)


def tiny_wan_vace(seed: int = 0) -> WanVACETransformer3DModel:
    """Wan with a VACE control branch (one VACE block, at layer 0; control latents of 6 channels)."""
    torch.manual_seed(seed)
    return _ready(WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0],
        vace_in_channels=6), seed)


def _grid_ids(h: int, w: int, columns: int, t: float = 0.0) -> torch.Tensor:
    """Position ids of an ``h x w`` token grid: (t, row, col[, 0])."""
    ids = torch.zeros(h, w, columns)
    ids[..., 0] = t
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, columns)


def _text_mask(batch: int) -> torch.Tensor:
    """1 for real text tokens; sample 0 has its last two tokens padded."""
    mask = torch.ones(batch, TEXT)
    mask[0, -2:] = 0
    return mask


def chroma_inputs(batch: int, h: int, w: int, seed: int = 0) -> dict:
    """``ChromaPipeline``: timestep = sigma, boolean mask over text + image tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.cat([_text_mask(batch).bool(), torch.ones(batch, h * w, dtype=torch.bool)], dim=1)
    return {
        "hidden_states": torch.randn(batch, h * w, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT, TEXT_DIM, generator=g),
        "timestep": torch.full((batch,), 0.1 + 0.8 * torch.rand(1, generator=g).item()),
        "img_ids": _grid_ids(h, w, 3),
        "txt_ids": torch.zeros(TEXT, 3),
        "attention_mask": mask,
    }


def flux2_inputs(batch: int, h: int, w: int, seed: int = 0, refs: tuple[int, int] | None = None) -> dict:
    """``Flux2Pipeline``: timestep = sigma, guidance, (T, H, W, L) ids; with ``refs=(rh, rw)``
    a reference image's ``rh * rw`` tokens (T = 10) appended to the latent tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = _grid_ids(h, w, 4)
    n = h * w
    if refs is not None:
        ids = torch.cat([ids, _grid_ids(*refs, 4, t=10.0)])
        n += refs[0] * refs[1]
    txt_ids = torch.zeros(TEXT, 4)
    txt_ids[:, 3] = torch.arange(TEXT)
    return {
        "hidden_states": torch.randn(batch, n, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT, TEXT_DIM, generator=g),
        "timestep": torch.full((batch,), 0.1 + 0.8 * torch.rand(1, generator=g).item()),
        "img_ids": ids,
        "txt_ids": txt_ids,
        "guidance": torch.full((batch,), 4.0),
    }


def flux2_kv_inputs(batch: int, h: int, w: int, seed: int = 0, refs: int = 6) -> dict:
    """``Flux2KleinKVPipeline`` after its first step: ``kv_cache_mode="cached"`` with a
    ``Flux2KVCache`` holding ``refs`` reference tokens' K/V per block (random here)."""
    inputs = flux2_inputs(batch, h, w, seed)
    g = torch.Generator().manual_seed(seed + 7)
    cache = Flux2KVCache(num_double_layers=1, num_single_layers=1)
    cache.num_ref_tokens = refs
    for layer in (*cache.double_block_caches, *cache.single_block_caches):
        layer.store(torch.randn(batch, refs, 2, 8, generator=g), torch.randn(batch, refs, 2, 8, generator=g))
    return {**inputs, "kv_cache": cache, "kv_cache_mode": "cached"}


def qwen_inputs(batch: int, h: int, w: int, seed: int = 0) -> dict:
    """``QwenImagePipeline``: timestep = sigma, packed latent tokens, text mask, img_shapes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, TEXT, TEXT_DIM, generator=g),
        "encoder_hidden_states_mask": _text_mask(batch),
        "timestep": torch.full((batch,), 0.1 + 0.8 * torch.rand(1, generator=g).item()),
        "img_shapes": [[(1, h, w)]] * batch,
    }


def wan_inputs(batch: int, h: int, w: int, seed: int = 0, frames: int = 3) -> dict:
    """``WanPipeline``: timestep = sigma * 1000, latent video ``[B, 4, frames, 2h, 2w]``
    (``h x w`` tokens per frame after the 1x2x2 patch embedding)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, frames, 2 * h, 2 * w, generator=g),
        "timestep": torch.full((batch,), 100.0 + 800.0 * torch.rand(1, generator=g).item()),
        "encoder_hidden_states": torch.randn(batch, TEXT, TEXT_DIM, generator=g),
    }


#: name -> (model builder, inputs(batch, h, w, seed))
FAMILY_MODELS = {
    "chroma": (tiny_chroma, chroma_inputs),
    "flux2": (tiny_flux2, flux2_inputs),
    "flux2_ref": (tiny_flux2, lambda b, h, w, seed=0: flux2_inputs(b, h, w, seed, refs=(2, 3))),
    "flux2_kv": (tiny_flux2_kv, flux2_kv_inputs),
    "qwenimage": (tiny_qwen, qwen_inputs),
    "wan": (tiny_wan, wan_inputs),
}
