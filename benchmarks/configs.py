"""Model configurations the benchmarks share (random weights unless trained)."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

#: "mid": an SD3-architecture model sized so that CPU matmuls dominate (issue #5)
MID_SD3 = dict(
    sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=8,
    attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
    caption_projection_dim=512, pooled_projection_dim=256, pos_embed_max_size=64,
)
MID_CONTEXT_TOKENS = 80
MID_LATENT = (16, 64, 64)  # 1024 image tokens after patch 2


def mid_sd3(seed: int = 0, dtype: torch.dtype = torch.float32) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**MID_SD3).to(dtype).eval().requires_grad_(False)


def mid_inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """One CFG call (batch 2: uncond + cond) at sigma 1."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, *MID_LATENT, generator=g).to(dtype)
    return dict(
        hidden_states=torch.cat([lat, lat]),
        encoder_hidden_states=torch.randn(2, MID_CONTEXT_TOKENS, 512, generator=g).to(dtype),
        pooled_projections=torch.randn(2, 256, generator=g).to(dtype),
        timestep=torch.full((2,), 1000.0),
    )


def euler_generate(transformer, inputs: dict, steps: int = 28, guidance: float = 7.0, shift: float = 3.0
                   ) -> torch.Tensor:
    """A 28-step SD3-style Euler flow-matching loop with batched CFG (shifted sigmas)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * t / (1 + (shift - 1) * t)
    x = inputs["hidden_states"][:1].clone()
    for i in range(steps):
        v_u, v_c = transformer(
            hidden_states=torch.cat([x, x]), encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            timestep=torch.full((2,), float(sigmas[i]) * 1000.0), return_dict=False,
        )[0].chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + guidance * (v_c - v_u))
    return x
