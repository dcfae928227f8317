"""Small trained text-to-image DiTs ("shapes zoo") for fidelity measurements.

Two pixel-space (no VAE) rectified-flow models trained on the procedural
coloured-shapes dataset of :mod:`specdiff_zoo.data`:

* ``"sd3"``: a :class:`diffusers.SD3Transformer2DModel`, input ``[B, 3, 32, 32]``
  (patch 2, 256 image tokens), called with ``timestep = sigma * 1000`` exactly
  like ``StableDiffusion3Pipeline``.
* ``"flux"``: a :class:`diffusers.FluxTransformer2DModel`, input 2x2-packed pixel
  tokens ``[B, 256, 12]`` (like ``FluxPipeline._pack_latents``), called with
  ``timestep = sigma`` in ``[0, 1]`` (``FluxPipeline`` divides by 1000 before
  the call) and a raw ``guidance`` scale.

Both predict the velocity ``v = noise - x0`` for ``x_sigma = (1 - sigma) x0 +
sigma noise``. Weights live in ``specdiff_zoo/weights`` and load fully
offline with :func:`load_shapes_dit`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import (
    VOCAB,
    colour_report,
    description_from_caption,
    make_dataset,
    sample,
    shape_colour_check,
    tokenize,
    tokenize_batch,
)
from .text import ShapesTextEncoder, TextEncoderConfig

__all__ = [
    "FAMILIES",
    "WEIGHTS_DIR",
    "ShapesModel",
    "build_transformer",
    "call_transformer",
    "colour_report",
    "default_transformer_config",
    "description_from_caption",
    "flow_sigmas",
    "load_shapes_dit",
    "make_dataset",
    "pack_pixels",
    "pixel_ids",
    "sample",
    "shape_colour_check",
    "to_uint8",
    "tokenize",
    "tokenize_batch",
    "unpack_pixels",
]

FAMILIES: tuple[str, ...] = ("sd3", "flux")
"""Supported model families."""

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
"""Directory holding ``shapes_<family>.safetensors`` and ``shapes_<family>.json``."""

IMAGE_SIZE: int = 32

TIMESTEP_CONVENTION: dict[str, str] = {
    "sd3": "transformer(timestep=sigma*1000); sigma in [0,1], x_sigma=(1-sigma)*x0+sigma*noise, predicts v=noise-x0",
    "flux": (
        "transformer(timestep=sigma, guidance=g) with sigma in [0,1] (diffusers multiplies by 1000 internally, "
        "FluxPipeline passes timestep/1000); x_sigma=(1-sigma)*x0+sigma*noise, predicts v=noise-x0; "
        "guidance is a raw scale (FluxPipeline convention) drawn U[1,5] in training with an unchanged target, "
        "so it is not distilled and has little effect"
    ),
}
"""Human-readable timestep convention per family (also written to the JSON)."""


def default_transformer_config(family: str) -> dict[str, Any]:
    """Constructor kwargs of the zoo transformer for ``family``."""
    if family == "sd3":
        return {
            "sample_size": IMAGE_SIZE,
            "patch_size": 2,
            "in_channels": 3,
            "out_channels": 3,
            "num_layers": 4,
            "attention_head_dim": 32,
            "num_attention_heads": 4,
            "joint_attention_dim": 128,
            "caption_projection_dim": 128,
            "pooled_projection_dim": 64,
            # PatchEmbed crops a (max x max) grid of patch positions: 32 px / patch 2 = 16.
            "pos_embed_max_size": 16,
        }
    if family == "flux":
        return {
            "patch_size": 1,
            "in_channels": 12,
            "out_channels": None,
            "num_layers": 2,
            "num_single_layers": 4,
            "attention_head_dim": 32,
            "num_attention_heads": 4,
            "joint_attention_dim": 128,
            "pooled_projection_dim": 64,
            "guidance_embeds": True,
            "axes_dims_rope": [8, 12, 12],
        }
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_transformer(family: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a randomly initialised zoo transformer."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cfg = dict(default_transformer_config(family) if config is None else config)
    if family == "sd3":
        return SD3Transformer2DModel(**cfg)
    if "axes_dims_rope" in cfg:
        cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel(**cfg)


def pack_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pack ``[B, C, H, W]`` into ``[B, (H/2)(W/2), 4C]`` tokens (FluxPipeline layout)."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_pixels(tokens: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack_pixels`."""
    b, _, c4 = tokens.shape
    c = c4 // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def pixel_ids(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, device: torch.device | str | None = None) -> torch.Tensor:
    """2-D ``img_ids`` ``[(H/2)(W/2), 3]`` = ``(0, row, col)`` as in FluxPipeline."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def call_transformer(
    family: str,
    transformer: Callable[..., Any],
    x: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled: torch.Tensor,
    sigma: torch.Tensor,
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predict the velocity for images ``x`` ``[B, 3, 32, 32]`` at noise level ``sigma`` ``[B]``.

    Encodes the per-family calling convention (timestep scale, packing, ids)
    in one place; used by both training and sampling. Returns ``[B, 3, 32, 32]``.
    """
    if family == "sd3":
        out = transformer(
            hidden_states=x,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled,
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]
        return out
    if guidance is None:
        guidance = torch.ones_like(sigma)
    out = transformer(
        hidden_states=pack_pixels(x),
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=pixel_ids(x.shape[-2], x.shape[-1], device=x.device).to(x.dtype),
        txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype),
        guidance=guidance,
        return_dict=False,
    )[0]
    return unpack_pixels(out, x.shape[-2], x.shape[-1])


def flow_sigmas(num_steps: int) -> torch.Tensor:
    """Sigmas ``[num_steps + 1]`` of diffusers' FlowMatchEulerDiscreteScheduler (shift 1), ending at 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler.sigmas.to(torch.float32)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Convert ``[B, 3, H, W]`` images in ``[-1, 1]`` to ``uint8`` ``[B, H, W, 3]``."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


@dataclass
class ShapesModel:
    """A loaded zoo model: transformer + text encoder + tokenizer + config."""

    family: str
    transformer: nn.Module
    text_encoder: ShapesTextEncoder
    config: dict[str, Any] = field(default_factory=dict)
    tokenize: Callable[[str], torch.LongTensor] = tokenize

    @property
    def device(self) -> torch.device:
        """Device of the transformer parameters."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the transformer parameters."""
        return next(self.transformer.parameters()).dtype

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts into ``(encoder_hidden_states [B, L, D], pooled [B, P])``."""
        ids = torch.stack([self.tokenize(p) for p in prompts]).to(self.device)
        hidden, pooled = self.text_encoder(ids)
        return hidden.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        num_steps: int = 28,
        guidance_scale: float | None = None,
        seed: int = 0,
        transformer: Callable[..., Any] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reference Euler flow-matching sampler; returns images ``[B, 3, 32, 32]`` in ``[-1, 1]``.

        Uses the FlowMatchEulerDiscreteScheduler sigmas (shift 1) and the update
        ``x <- x + (sigma_next - sigma) * v``. SD3 applies classifier-free
        guidance with one batched call of size ``2B`` (uncond first, like
        StableDiffusion3Pipeline); FLUX makes a single call with the guidance
        embedding set to ``guidance_scale``. ``transformer`` may replace the
        model's own (e.g. a compiled module); it is called with the same
        keyword arguments as the diffusers model and ``return_dict=False``.
        Initial noise comes from ``torch.Generator().manual_seed(seed)`` on CPU
        unless ``latents`` is given.
        """
        fn = self.transformer if transformer is None else transformer
        if guidance_scale is None:
            guidance_scale = float(self.config.get("default_guidance_scale", 4.0))
        b = len(prompts)
        if latents is None:
            gen = torch.Generator().manual_seed(seed)
            latents = torch.randn(b, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        x = latents.to(self.device, self.dtype)
        hidden, pooled = self.encode(list(prompts))
        if self.family == "sd3":
            null_hidden, null_pooled = self.encode([""] * b)
            hidden = torch.cat([null_hidden, hidden])
            pooled = torch.cat([null_pooled, pooled])
        sigmas = flow_sigmas(num_steps).to(self.device)
        for i in range(num_steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if self.family == "sd3":
                x_in = torch.cat([x, x])
                s = sigma.expand(2 * b).to(self.dtype)
                v_uncond, v_cond = call_transformer("sd3", fn, x_in, hidden, pooled, s).chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                s = sigma.expand(b).to(self.dtype)
                g = torch.full((b,), guidance_scale, device=self.device, dtype=self.dtype)
                v = call_transformer("flux", fn, x, hidden, pooled, s, guidance=g)
            x = x + (sigma_next - sigma).to(self.dtype) * v
        return x.float().clamp(-1, 1)


def load_shapes_dit(
    family: str = "sd3",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights_dir: str | Path | None = None,
) -> ShapesModel:
    """Load a trained zoo model offline from ``weights_dir`` (default :data:`WEIGHTS_DIR`).

    Reads ``shapes_<family>.json`` (configs) and ``shapes_<family>.safetensors``
    (keys prefixed ``transformer.`` / ``text_encoder.``). Modules are put in
    eval mode, moved to ``device`` and cast to ``dtype``.
    """
    from safetensors.torch import load_file

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    config = json.loads((root / f"shapes_{family}.json").read_text())
    state = load_file(str(root / f"shapes_{family}.safetensors"))
    transformer = build_transformer(family, config["transformer"])
    text_encoder = ShapesTextEncoder(TextEncoderConfig(**config["text_encoder"]))
    if list(config.get("vocab", VOCAB)) != list(VOCAB):
        raise ValueError("vocabulary in the weights config does not match specdiff_zoo.data.VOCAB")
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        sub = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
        module.to(device=device).eval().requires_grad_(False)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    return ShapesModel(family=family, transformer=transformer, text_encoder=text_encoder, config=config)
