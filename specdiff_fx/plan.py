"""The frozen result of DiT analysis, read by every rewrite pass and by the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from .layout import Layout, NodeLayout, Seg


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
    """One scaled-dot-product attention call on image tokens (its queries carry them).

    ``layout`` is the token layout of its keys and values (token axis ``-2``; the queries'
    is the same, or the same without context tokens that only the keys hold; for a
    cross-attention site, whose keys carry no image tokens, the queries');
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
    #: index of the model's output (what ``plan.end`` becomes) among the graph's outputs; Dynamo
    #: puts values written back to module attributes before it (a LoRA scale set inside
    #: ``forward``)
    sample_output: int = 0
    #: ``(axis, length)`` of the leading part of the latent input that the output matches, where the
    #: input is wider than the output on one axis (Wan image-to-video: ``cat([latents, condition],
    #: dim=1)``; FLUX Fill: ``dim=2``): the part the sampler moves, the rest being conditioning.
    #: None: the latent input is shaped like the output
    moving: tuple[int, int] | None = None
    weight_input: int | None = None  # index of a parameter input: identifies the model at run time
    #: indices of the conditioning inputs (neither latent, timestep nor module state, read by the
    #: graph, not carrying image tokens into the stream as ControlNet residuals do): fixed through a
    #: generation, they tell interleaved generations apart at run time
    condition_inputs: tuple[int, ...] = ()
    #: indices of the module-state inputs (parameters, buffers, attributes Dynamo passes as inputs,
    #: e.g. a LoRA scale): a generation's caches hold for the values they had at its calls. Tensors
    #: are stamped by storage and version counter; ``state_values`` are those read by value
    #: (numbers, and one-element tensors on the CPU, as Dynamo passes a changed float attribute)
    state_tensors: tuple[int, ...] = ()
    state_values: tuple[int, ...] = ()
    # attention calls whose queries are image tokens but whose keys are not (cross-attention to
    # text): per query token, so they need no K/V cache; ``attention`` lists only those with image keys
    cross_attention: tuple[AttentionSite, ...] = ()
    # the token stream's segments when it carries context tokens besides the image tokens (FLUX.2's
    # reference images: ``(("img", N), ("txt", R))``); None: the stream is the N image tokens alone
    stream: Layout | None = None
    # where those context tokens are marked: (graph input index, column) of the position ids whose
    # nonzero entries are context; the segmentation holds for calls whose ids mark the same tokens
    context_ids: tuple[int, int] | None = None
    #: context parallelism (:func:`~specdiff_fx.passes.collapse_ulysses`): ``(group name, world
    #: size, rank)``; the graph computes this rank's shard of the tokens (``num_image_tokens`` of
    #: them), every rank must run the same variant at the same call
    parallel: tuple[str, int, int] | None = None
    layouts: Mapping[str, NodeLayout] = field(default_factory=dict, compare=False, repr=False)
    #: text subsets (``ContextMode.SUBSET``): the text stream's start (the family's text input,
    #: ``[B, M, C]``), ``M``, and the layouts traced from both starts (``text_layouts``: as
    #: ``layouts``, but the text stream before the first attention carries ``(txt M)`` layouts too);
    #: ``text_subset_error`` says why the graph supports no text subset (``text_layouts`` then empty)
    text_start: str | None = None
    num_text_tokens: int = 0
    text_subset_error: str | None = None
    text_layouts: Mapping[str, NodeLayout] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layouts", MappingProxyType(dict(self.layouts)))
        object.__setattr__(self, "text_layouts", MappingProxyType(dict(self.text_layouts)))

    def check_text_subset(self, k_txt: int) -> None:
        """Raise ``ValueError`` unless a variant may compute ``k_txt`` of the text tokens."""
        if self.text_start is None or self.text_subset_error:
            raise ValueError(f"specdiff: {self.family} graph supports no text subset (ContextMode.SUBSET): "
                             f"{self.text_subset_error or 'no text stream found'}")
        if not 0 <= k_txt <= self.num_text_tokens:
            raise ValueError(f"k_txt={k_txt} outside [0, {self.num_text_tokens}]")

    @property
    def stream_length(self) -> int:
        """Tokens of the stream ``[B, L, D]`` (image tokens plus any context tokens in it)."""
        return self.stream.length if self.stream is not None else self.num_image_tokens

    def stream_matches(self, args: Sequence[Any]) -> bool:
        """Whether a call's inputs mark the stream's context tokens as at compile time.

        The segmentation comes from the position-id values of the compile-time example;
        a later call of the same shapes may mark other tokens (another reference-image
        layout of the same total length), and Dynamo does not recompile on values. A
        runtime must check this per call and compute every token when it is ``False``.
        Always ``True`` for a family that marks no context tokens (``context_ids`` is None).
        """
        if self.context_ids is None:
            return True
        i, column = self.context_ids
        ids = args[i]
        if not isinstance(ids, torch.Tensor):
            return False
        ids = self.shard(ids)
        expected = self.stream.spec() if self.stream is not None else (("img", self.num_image_tokens),)
        return tuple((s.kind, s.length) for s in stream_segments(ids, column)) == expected

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full-length token input (position ids ``[..., L, c]``) under
        context parallelism, as diffusers' split gives them to it; ``rows`` itself otherwise."""
        if self.parallel is None:
            return rows
        _, world, rank = self.parallel
        return rows.chunk(world, dim=-2)[rank]

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for b in self.blocks:
            kinds[b.kind] = kinds.get(b.kind, 0) + 1
        return (
            f"{self.family}: {self.num_image_tokens} image tokens x {self.width} channels, batch {self.batch}, "
            f"blocks {kinds}, {len(self.attention)} attention calls"
            + (f" (+{len(self.cross_attention)} cross-attention)" if self.cross_attention else "") + ", "
            f"{len(self.side_inputs)} token-shaped side inputs"
            + (f", {self.stream_length - self.num_image_tokens} context tokens in the stream" if self.stream else "")
            + (f"; context parallel over {self.parallel[1]} ranks (this rank's shard)" if self.parallel else "")
        )


def stream_segments(ids: torch.Tensor, column: int) -> tuple[Seg, ...]:
    """Runs of image tokens (``ids[..., column] == 0``) and context tokens (nonzero) along
    the rows of position ids ``[L, c]`` (or ``[B, L, c]``, read from the first sample, as
    the models do)."""
    if ids.dim() == 3:
        ids = ids[0]
    context = (ids[:, column] != 0).tolist()
    segs: list[Seg] = []
    for flag in context:
        kind = "txt" if flag else "img"
        if segs and segs[-1].kind == kind:
            segs[-1] = Seg(kind, segs[-1].length + 1)
        else:
            segs.append(Seg(kind, 1))
    return tuple(segs)
