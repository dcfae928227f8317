"""Tiny trainable text encoder for the shapes zoo.

Token embedding + learned positional embedding + a few pre-norm transformer
layers, producing the two conditioning signals that SD3/FLUX-style DiTs expect:

* ``encoder_hidden_states`` ``[B, L, joint_attention_dim]`` (per token), and
* ``pooled_projections`` ``[B, pooled_dim]`` (mean over tokens + linear).

Padding tokens are attended to like any other token (no key mask), so the empty
caption, which tokenizes to an all-pad sequence, still yields finite features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TextEncoderConfig:
    """Hyper-parameters of :class:`ShapesTextEncoder`."""

    vocab_size: int
    max_len: int = 12
    width: int = 128
    num_layers: int = 1
    num_heads: int = 4
    joint_attention_dim: int = 128
    pooled_dim: int = 64

    def to_dict(self) -> dict[str, int]:
        """Plain-dict view, for JSON serialisation."""
        return asdict(self)


class _Block(nn.Module):
    """Pre-norm self-attention + GELU MLP block."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[B, L, width]``."""
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, w // self.num_heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ShapesTextEncoder(nn.Module):
    """Small text encoder trained jointly with the zoo DiTs."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_len, config.width))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.blocks = nn.ModuleList(_Block(config.width, config.num_heads) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.width)
        self.hidden_proj = nn.Linear(config.width, config.joint_attention_dim)
        self.pooled_proj = nn.Linear(config.width, config.pooled_dim)

    def forward(self, token_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``[B, L]`` token ids into ``(encoder_hidden_states, pooled)``."""
        x = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.hidden_proj(x), self.pooled_proj(x.mean(dim=1))
