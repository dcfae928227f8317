"""The one table of per-model facts.

Everything else in the backend is generic (token layouts are *propagated*, not looked
up); what a model family must tell us is only where the image-token stream is born and
where it leaves, which modules are the transformer blocks, how its ``timestep`` input maps
onto the flow-matching sigma (for the runtime's speculative pre-run), and whether position
ids mark context tokens inside the stream, and which graph input holds the text tokens (where a
text subset, ``ContextMode.SUBSET``, is gathered; ``text`` below).

========  ===========================  ==================  ===========  ========  ==========================
name      model class                  embed -> out_proj   t / sigma    context   what the general rules meet
========  ===========================  ==================  ===========  ========  ==========================
sd3       SD3Transformer2DModel        pos_embed           1000         -         joint attention, image first
flux      FluxTransformer2DModel       x_embedder          1            -         text first, RoPE tables
chroma    ChromaTransformer2DModel     x_embedder          1            -         + a text mask [B, 1, S, S]
flux2     Flux2Transformer2DModel      x_embedder          1            img_ids   4-axis RoPE; reference images
                                                                        col 0     in the stream (T != 0); cached
                                                                                  reference K/V in the keys (Klein KV)
qwenimage QwenImageTransformer2DModel  img_in              1            -         key-only text mask, complex RoPE
wan       WanTransformer3DModel        patch_embedding     1000         -         Conv3d + flatten/transpose,
                                                                                  cross-attention to text, RoPE
                                                                                  written in place, per-token t
========  ===========================  ==================  ===========  ========  ==========================

``text`` is ``encoder_hidden_states`` for all: every family's text tokens enter there and pass
only per-token ops until an attention. Whether a text subset is exact for a graph is then
decided by the general layout rules (:func:`~specdiff_fx.passes.analyze_dit` says why not in
``DiTPlan.text_subset_error``: e.g. Wan's cross-attention keys, FLUX.2's reference tokens).

``t / sigma`` is ``timestep_per_sigma`` as read off each family's pipelines (``__call__``):
SD3 passes ``t = sigma * 1000``; FLUX, Chroma, FLUX.2 (and Klein) and Qwen-Image pass
``t / 1000``; Wan passes ``t`` (its UniPC / flow-match schedulers' ``sigma * 1000``).
``out_proj`` is ``proj_out`` for all. Anything a family needs beyond this row is a general
layout rule in :mod:`specdiff_fx.layout`, never a per-model branch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Facts about one diffusers DiT class.

    Attributes:
        name: short name used in records and telemetry.
        model_class: the diffusers class name (for messages).
        block_types: class names of the transformer blocks (used to recognise the model
            from ``nn_module_stack``).
        block_lists: attribute paths of the ``ModuleList`` s holding those blocks.
        embed: module path whose last output is the image-token stream ``[B, N, D]``.
        out_proj: module path whose output is the per-token output before unpatchify.
        timestep_per_sigma: ``timestep = sigma * timestep_per_sigma`` at the model input
            (SD3 pipelines pass ``sigma * 1000``; FLUX pipelines pass ``sigma``).
        context_ids: ``(input, column)`` when the image-token stream may also carry
            context tokens (FLUX.2's reference images for editing, appended to the latent
            tokens): a stream token whose position id ``input[..., column]`` is nonzero is
            context — always computed, never selected or cached as an image token.
        text_input: the graph input holding the text tokens ``[B, M, C]`` (the text stream's
            start, gathered at ``Role.TEXT_IDX`` by a ``ContextMode.SUBSET`` variant); ``None``:
            the family supports no text subset.
    """

    name: str
    model_class: str
    block_types: tuple[str, ...]
    block_lists: tuple[str, ...]
    embed: str
    out_proj: str
    timestep_per_sigma: float
    context_ids: tuple[str, int] | None = None
    text_input: str | None = "encoder_hidden_states"


FAMILIES: tuple[Family, ...] = (
    Family(
        name="sd3",
        model_class="SD3Transformer2DModel",
        block_types=("JointTransformerBlock",),
        block_lists=("transformer_blocks",),
        embed="pos_embed",
        out_proj="proj_out",
        timestep_per_sigma=1000.0,
    ),
    Family(
        name="flux",
        model_class="FluxTransformer2DModel",
        block_types=("FluxTransformerBlock", "FluxSingleTransformerBlock"),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        embed="x_embedder",
        out_proj="proj_out",
        timestep_per_sigma=1.0,
    ),
    Family(
        name="chroma",
        model_class="ChromaTransformer2DModel",
        block_types=("ChromaTransformerBlock", "ChromaSingleTransformerBlock"),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        embed="x_embedder",
        out_proj="proj_out",
        timestep_per_sigma=1.0,  # ChromaPipeline: timestep=t / 1000, t = sigma * 1000
    ),
    Family(
        name="flux2",
        model_class="Flux2Transformer2DModel",
        block_types=("Flux2TransformerBlock", "Flux2SingleTransformerBlock"),
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        embed="x_embedder",
        out_proj="proj_out",
        timestep_per_sigma=1.0,  # Flux2Pipeline / Flux2KleinPipeline: timestep=t / 1000
        context_ids=("img_ids", 0),  # (T, H, W, L) ids: the latent has T = 0, reference images T = 10, 20, ...
    ),
    Family(
        name="qwenimage",
        model_class="QwenImageTransformer2DModel",
        block_types=("QwenImageTransformerBlock",),
        block_lists=("transformer_blocks",),
        embed="img_in",
        out_proj="proj_out",
        timestep_per_sigma=1.0,  # QwenImagePipeline: timestep=t / 1000
    ),
    Family(
        name="wan",
        model_class="WanTransformer3DModel",
        block_types=("WanTransformerBlock",),
        block_lists=("blocks",),
        embed="patch_embedding",  # Conv3d: the stream starts after its flatten(2).transpose(1, 2)
        out_proj="proj_out",
        timestep_per_sigma=1000.0,  # WanPipeline: timestep=t, t = sigma * 1000 (UniPC / flow-match)
    ),
)


def family_for_block_types(type_names: set[str]) -> Family | None:
    """The family whose block classes appear among ``type_names``, if exactly one does."""
    hits = [f for f in FAMILIES if type_names.intersection(f.block_types)]
    return hits[0] if len(hits) == 1 else None
