"""Small trained text-to-image DiTs ("shapes zoo") for fidelity measurements.

Pixel-space (no VAE) rectified-flow models trained on the procedural
coloured-shapes dataset of :mod:`specdiff_zoo.data`, in two families:

* ``"sd3"``: a :class:`diffusers.SD3Transformer2DModel`, input ``[B, 3, S, S]``
  (patch 2, ``(S/2)^2`` image tokens), called with ``timestep = sigma * 1000``
  exactly like ``StableDiffusion3Pipeline``.
* ``"flux"``: a :class:`diffusers.FluxTransformer2DModel`, input 2x2-packed pixel
  tokens ``[B, (S/2)^2, 12]`` (like ``FluxPipeline._pack_latents``), called with
  ``timestep = sigma`` in ``[0, 1]`` (``FluxPipeline`` divides by 1000 before
  the call) and a raw ``guidance`` scale.

All predict the velocity ``v = noise - x0`` for ``x_sigma = (1 - sigma) x0 +
sigma noise``. The trained models are listed in :data:`MODELS` (a
:class:`ZooModel` each): the ``"tune"`` split (``"sd3"``, ``"flux"``, 32 px,
256 image tokens; ``"flux_64t"``, the ``"flux"`` model continued at 64 px:
1024 image tokens; ``"flux_64s"``, a FLUX trained from scratch at 64 px; ``"sd3_t"``, a
second SD3 at 32 px, narrower and one layer deeper) is what
the method's defaults are chosen on; the
``"heldout"`` split differs in seed, depth/width, training length and image
size and was not used to choose anything. Weights live in
``specdiff_zoo/weights`` and load fully offline with :func:`load_shapes_dit`.
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
    "MODELS",
    "SPLITS",
    "WEIGHTS_DIR",
    "ShapesModel",
    "ZooModel",
    "build_transformer",
    "call_transformer",
    "colour_report",
    "default_axes_dims_rope",
    "default_transformer_config",
    "description_from_caption",
    "flow_sigmas",
    "load_shapes_dit",
    "make_dataset",
    "models",
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
"""Directory holding ``<stem>.safetensors``, ``<stem>.json`` and ``<stem>_loss.csv`` per model."""

IMAGE_SIZE: int = 32
"""Image size of the tune models and default of the size-dependent helpers."""

SPLITS: tuple[str, ...] = ("tune", "heldout")
"""Registry splits: ``"tune"`` models chose the method's defaults, ``"heldout"`` models never did."""


@dataclass(frozen=True)
class ZooModel:
    """A registry entry: one trained zoo model.

    ``weights`` is the file stem in :data:`WEIGHTS_DIR` (``<weights>.safetensors``
    and ``<weights>.json``); ``image_size`` the side of its square pixel input.
    """

    name: str
    family: str
    split: str
    image_size: int
    weights: str
    description: str
    #: whether its samples follow the prompts (the colour check passes); an undertrained
    #: model is still a fair held-out test of caching, which is measured against its own
    #: full-compute samples
    follows_prompts: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {SPLITS}")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per sample: ``(image_size / 2)^2`` for both families."""
        return (self.image_size // 2) ** 2

    def paths(self, weights_dir: str | Path | None = None) -> tuple[Path, Path]:
        """``(json, safetensors)`` paths in ``weights_dir`` (default :data:`WEIGHTS_DIR`)."""
        root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
        return root / f"{self.weights}.json", root / f"{self.weights}.safetensors"

    def has_weights(self, weights_dir: str | Path | None = None) -> bool:
        """Whether both weight files exist in ``weights_dir``."""
        return all(p.is_file() for p in self.paths(weights_dir))


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("sd3", "sd3", "tune", 32, "shapes_sd3",
                 "SD3 MMDiT, 4 layers, 4 heads x 32, 256 image tokens; tuned the SD3 defaults"),
        ZooModel("flux", "flux", "tune", 32, "shapes_flux",
                 "FLUX, 2 double + 4 single blocks, 4 heads x 32, 256 image tokens; tuned the FLUX defaults"),
        ZooModel("flux_64t", "flux", "tune", 64, "shapes_flux_64t",
                 "FLUX, 2 double + 4 single blocks, 4 heads x 32, 1024 image tokens (64 px): the tune flux "
                 "model continued at 64 px, seed 21, 500 steps at batch 12; colour blobs rather than clean "
                 "shapes (the regime of the 1024-token held-out model)",
                 follows_prompts=False),
        ZooModel("flux_64s", "flux", "tune", 64, "shapes_flux_64s",
                 "FLUX, 2 double + 3 single blocks, 4 heads x 32, 1024 image tokens (64 px), trained from "
                 "scratch at 64 px: seed 29, 800 steps at batch 12; undertrained, colour blobs (a tune model "
                 "in the regime of the 1024-token held-out model, added after that model's unguided cells "
                 "were seen to have less margin than the other tune models')",
                 follows_prompts=False),
        ZooModel("sd3_t", "sd3", "tune", 32, "shapes_sd3_t",
                 "SD3 MMDiT, 5 layers, 4 heads x 24, 256 image tokens; seed 41, 1100 + 500 steps at batch 24 "
                 "(a second SD3 tune model, added after a rule that passed the first one's 20-step cell by "
                 "0.16 dB of the image floor missed that floor on the held-out SD3 model)"),
        ZooModel("sd3_b", "sd3", "heldout", 32, "shapes_sd3_b",
                 "SD3 MMDiT, 6 layers, 3 heads x 32, 256 image tokens; seed 11, 1000 + 900 steps at batch 24"),
        ZooModel("flux_64", "flux", "heldout", 64, "shapes_flux_64",
                 "FLUX, 2 double + 2 single blocks, 4 heads x 32, 1024 image tokens (64 px); seed 13, "
                 "1000 steps at batch 12; undertrained: colour blobs rather than clean shapes",
                 follows_prompts=False),
    )
}
"""Every trained zoo model by name."""


def models(split: str | None = None, family: str | None = None) -> list[ZooModel]:
    """Registry entries, optionally filtered by ``split`` and/or ``family``, in registry order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return [m for m in MODELS.values()
            if (split is None or m.split == split) and (family is None or m.family == family)]

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


def default_axes_dims_rope(head_dim: int) -> list[int]:
    """FLUX rotary dims ``[id, row, col]`` (even, summing to ``head_dim``); ``[8, 12, 12]`` for 32."""
    if head_dim % 4 or head_dim < 8:
        raise ValueError(f"FLUX head_dim must be a multiple of 4 and >= 8, got {head_dim}")
    first = 2 * (head_dim // 8)
    row = 2 * ((head_dim - first) // 4)
    return [first, row, head_dim - first - row]


def default_transformer_config(
    family: str,
    image_size: int = IMAGE_SIZE,
    num_layers: int | None = None,
    num_single_layers: int | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    axes_dims_rope: list[int] | None = None,
) -> dict[str, Any]:
    """Constructor kwargs of the zoo transformer for ``family``.

    With no overrides this is the architecture of ``"sd3"``, ``"flux"`` and
    ``"flux_64t"`` (at ``image_size`` 32 exactly the first two's stored config;
    ``"flux_64s"`` has one single-stream block less). ``num_layers`` counts SD3 joint blocks or
    FLUX double-stream blocks; ``num_single_layers`` (FLUX only) the
    single-stream blocks; ``heads`` x ``head_dim`` is the width. SD3's
    ``caption_projection_dim`` follows the width and its ``sample_size`` /
    ``pos_embed_max_size`` the image size; FLUX's ``axes_dims_rope`` defaults
    to :func:`default_axes_dims_rope` of ``head_dim``.
    """
    if image_size <= 0 or image_size % 2:
        raise ValueError(f"image_size must be a positive even number, got {image_size}")
    if family == "sd3":
        if num_single_layers is not None:
            raise ValueError("num_single_layers applies to the flux family only")
        if axes_dims_rope is not None:
            raise ValueError("axes_dims_rope applies to the flux family only")
        h = 4 if heads is None else heads
        d = 32 if head_dim is None else head_dim
        return {
            "sample_size": image_size,
            "patch_size": 2,
            "in_channels": 3,
            "out_channels": 3,
            "num_layers": 4 if num_layers is None else num_layers,
            "attention_head_dim": d,
            "num_attention_heads": h,
            "joint_attention_dim": 128,
            # the context stream runs at the transformer width
            "caption_projection_dim": h * d,
            "pooled_projection_dim": 64,
            # PatchEmbed crops a (max x max) grid of patch positions: image_size / patch 2.
            "pos_embed_max_size": image_size // 2,
        }
    if family == "flux":
        d = 32 if head_dim is None else head_dim
        rope = default_axes_dims_rope(d) if axes_dims_rope is None else [int(a) for a in axes_dims_rope]
        if sum(rope) != d or len(rope) != 3 or any(a % 2 for a in rope):
            raise ValueError(f"axes_dims_rope {rope} must be 3 even numbers summing to head_dim {d}")
        return {
            "patch_size": 1,
            "in_channels": 12,
            "out_channels": None,
            "num_layers": 2 if num_layers is None else num_layers,
            "num_single_layers": 4 if num_single_layers is None else num_single_layers,
            "attention_head_dim": d,
            "num_attention_heads": 4 if heads is None else heads,
            "joint_attention_dim": 128,
            "pooled_projection_dim": 64,
            "guidance_embeds": True,
            "axes_dims_rope": rope,
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
    """Predict the velocity for images ``x`` ``[B, 3, H, W]`` at noise level ``sigma`` ``[B]``.

    Encodes the per-family calling convention (timestep scale, packing, ids)
    in one place; used by both training and sampling. ``H`` and ``W`` are even
    (and within the SD3 model's ``pos_embed_max_size`` patches). Returns
    ``[B, 3, H, W]``.
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
    """A loaded zoo model: transformer + text encoder + tokenizer + config.

    ``name`` defaults to the family and ``image_size`` to the config's
    ``image_size`` (32 when absent).
    """

    family: str
    transformer: nn.Module
    text_encoder: ShapesTextEncoder
    config: dict[str, Any] = field(default_factory=dict)
    tokenize: Callable[[str], torch.LongTensor] = tokenize
    name: str | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = self.family
        if self.image_size is None:
            self.image_size = int(self.config.get("image_size", IMAGE_SIZE))

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per sample: ``(image_size / 2)^2``."""
        return (self.image_size // 2) ** 2

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
        """Reference Euler flow-matching sampler; returns images ``[B, 3, S, S]`` in ``[-1, 1]``.

        ``S`` is :attr:`image_size` (``latents``, if given, set it instead).

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
            latents = torch.randn(b, 3, self.image_size, self.image_size, generator=gen)
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
    name: str = "sd3",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weights_dir: str | Path | None = None,
) -> ShapesModel:
    """Load a trained zoo model offline by registry name (see :data:`MODELS`).

    Reads ``<stem>.json`` (configs) and ``<stem>.safetensors`` (keys prefixed
    ``transformer.`` / ``text_encoder.``, float32 or float16; loaded as float32)
    from ``weights_dir`` (default :data:`WEIGHTS_DIR`), ``stem`` being the
    entry's ``weights``. With an explicit ``weights_dir``, a name outside the
    registry loads ``shapes_<name>`` from there (the output of
    ``scripts/train_shapes.py --name <name>``). The family and image size come
    from the JSON. Modules are put in eval mode, moved to ``device`` and cast to
    ``dtype``. Raises :class:`ValueError` for an unknown name and
    :class:`FileNotFoundError` when the weight files are missing.
    """
    from safetensors.torch import load_file

    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    entry = MODELS.get(name)
    if entry is None and weights_dir is None:
        raise ValueError(f"unknown zoo model {name!r}; registered models: {', '.join(MODELS)}")
    stem = entry.weights if entry is not None else f"shapes_{name}"
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    json_path, st_path = root / f"{stem}.json", root / f"{stem}.safetensors"
    for path in (json_path, st_path):
        if not path.is_file():
            raise FileNotFoundError(f"zoo model {name!r}: missing {path}")
    config = json.loads(json_path.read_text())
    family = config.get("family")
    if family not in FAMILIES:
        raise ValueError(f"{json_path}: unknown family {family!r}; expected one of {FAMILIES}")
    if entry is not None and (entry.family, entry.image_size) != (family, int(config.get("image_size", IMAGE_SIZE))):
        raise ValueError(f"{json_path} does not match the registry entry {entry}")
    state = load_file(str(st_path))
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
    return ShapesModel(family=family, transformer=transformer, text_encoder=text_encoder, config=config,
                       name=name, image_size=int(config.get("image_size", IMAGE_SIZE)))
