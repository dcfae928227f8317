"""The frozen result of DiT analysis, read by every rewrite pass and by the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .layout import Layout, NodeLayout


@dataclass(frozen=True)
class Block:
    """One transformer block: a contiguous run of graph nodes of one module."""

    path: str  # e.g. "transformer_blocks.3"
    kind: str  # the block's class name
    first: str  # first node name
    last: str  # last node name
    num_nodes: int


@dataclass(frozen=True)
class AttentionSite:
    """One scaled-dot-product attention call on image tokens.

    ``layout`` is the token layout of its query/key/value (token axis ``-2``);
    ``img_offset`` is where the image segment starts in that axis (0: image first,
    as in SD3; M: text first, as in FLUX).
    """

    node: str
    block: str
    layout: Layout
    heads: int
    head_dim: int
    scale: float | None

    @property
    def img_offset(self) -> int:
        return self.layout.img_offset()

    @property
    def image_first(self) -> bool:
        return self.layout.segs[0].kind == "img"


@dataclass(frozen=True)
class DiTPlan:
    """What :func:`specdiff_fx.passes.analyze_dit` found in a Dynamo graph.

    Node references are node *names*, valid in the analysed graph and in any clone of it.
    """

    family: str
    batch: int
    num_image_tokens: int
    width: int  # channels of the image-token stream
    out_channels: int  # channels of the per-token output
    start: str  # node whose value is the image-token stream [B, N, D]
    end: str  # node whose value is the per-token output [B, N, C]
    blocks: tuple[Block, ...]
    attention: tuple[AttentionSite, ...]
    side_inputs: tuple[str, ...]  # full-length token operands gathered in the subset graph
    timestep_input: int  # index of the timestep among the graph inputs
    sample_input: int  # index of the latent (hidden_states) among the graph inputs
    timestep_per_sigma: float
    weight_input: int | None = None  # index of a parameter input: identifies the model at run time
    #: indices of the conditioning inputs (neither latent, timestep nor module state): fixed
    #: through a generation, they tell interleaved generations apart at run time
    condition_inputs: tuple[int, ...] = ()
    layouts: Mapping[str, NodeLayout] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layouts", MappingProxyType(dict(self.layouts)))

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for b in self.blocks:
            kinds[b.kind] = kinds.get(b.kind, 0) + 1
        return (
            f"{self.family}: {self.num_image_tokens} image tokens x {self.width} channels, batch {self.batch}, "
            f"blocks {kinds}, {len(self.attention)} attention calls, "
            f"{len(self.side_inputs)} token-shaped side inputs"
        )
