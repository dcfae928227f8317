"""Tiny, complete, offline ``QwenImagePipeline`` and ``WanPipeline`` for tests.

As in ``pipelines.py`` (which builds SD3 and FLUX), every component is built from a
config in code with seeded random weights; nothing is downloaded.

* **Qwen-Image**: ``QwenImageTransformer2DModel`` (2 blocks, 2 heads x 8), a tiny
  ``Qwen2_5_VLForConditionalGeneration`` text encoder (1 layer, hidden 16; its vision tower
  is never run), the T5-like tiny tokenizer of ``pipelines.py`` (the pipeline only calls
  it; the Qwen chat template it wraps the prompt in then tokenizes character by character,
  and the pipeline drops the template's first 34 tokens as it does for the real one), a
  tiny ``AutoencoderKLQwenImage`` (z_dim 4, two levels: ``vae_scale_factor = 2``) and
  ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's dynamic shift. 32x32 -> latent
  16x16 -> 8x8 = 64 image tokens.
* **Wan**: ``WanTransformer3DModel`` (2 blocks, 2 heads x 12), a tiny ``UMT5EncoderModel``
  with the same tokenizer, a tiny ``AutoencoderKLWan`` (z_dim 4, spatial and temporal
  factor 2) and ``UniPCMultistepScheduler`` with flow sigmas (as Wan 2.1). 16x32, 5 frames
  -> latent 3 x 8 x 16 -> 3 x 4 x 8 = 96 video tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, UMT5Config, UMT5EncoderModel

from pipelines import _ready, _seeded, tiny_t5_tokenizer

Z = 4  # latent channels of both VAEs


def tiny_qwen_text_encoder(vocab: int, seed: int, hidden: int = 16, tokenizer_eos: int = 1,
                           tokenizer_pad: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
            "bos_token_id": None, "eos_token_id": tokenizer_eos, "pad_token_id": tokenizer_pad,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden, "fullatt_block_indexes": [0]},
        bos_token_id=None, eos_token_id=tokenizer_eos, pad_token_id=tokenizer_pad,
    )
    with _seeded(seed):
        return _ready(Qwen2_5_VLForConditionalGeneration(config))


def tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    tokenizer = tiny_t5_tokenizer()
    with _seeded(seed):
        transformer = _ready(QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * Z, out_channels=Z, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(2, 2, 4)))
    with _seeded(seed + 1):
        vae = _ready(AutoencoderKLQwenImage(base_dim=8, z_dim=Z, dim_mult=[1, 2], num_res_blocks=1,
                                            temperal_downsample=[False], latents_mean=[0.0] * Z,
                                            latents_std=[1.0] * Z))
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae,
                             text_encoder=tiny_qwen_text_encoder(len(tokenizer), seed + 2, tokenizer_eos=tokenizer.eos_token_id,
                                                                 tokenizer_pad=tokenizer.pad_token_id),
                             tokenizer=tokenizer,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwenimage_call_kwargs(seed: int = 0, **extra: Any) -> dict[str, Any]:
    """No CFG (``true_cfg_scale`` 1): one transformer call per step."""
    return {"prompt": "a photo of a red cat", "height": 32, "width": 32, "num_inference_steps": 6,
            "true_cfg_scale": 1.0, "output_type": "pt", "generator": torch.Generator().manual_seed(seed), **extra}


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    tokenizer = tiny_t5_tokenizer()
    with _seeded(seed):
        transformer = _ready(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=Z, out_channels=Z,
            text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32))
    with _seeded(seed + 1):
        vae = _ready(AutoencoderKLWan(base_dim=8, z_dim=Z, dim_mult=[1, 2], num_res_blocks=1,
                                      temperal_downsample=[True], latents_mean=[0.0] * Z, latents_std=[1.0] * Z,
                                      scale_factor_spatial=2, scale_factor_temporal=2))
    with _seeded(seed + 2):
        text_encoder = _ready(UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call_kwargs(seed: int = 0, **extra: Any) -> dict[str, Any]:
    """CFG 5 (two transformer calls per step, cond then uncond), 5 frames (3 latent frames)."""
    return {"prompt": "a cat riding a horse", "negative_prompt": "blurry", "height": 16, "width": 32,
            "num_frames": 5, "num_inference_steps": 6, "guidance_scale": 5.0, "max_sequence_length": 16,
            "output_type": "pt", "generator": torch.Generator().manual_seed(seed), **extra}
