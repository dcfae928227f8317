"""Tiny, complete, offline diffusers text-to-image pipelines for tests.

Every component (transformer, text encoders, tokenizers, VAE, scheduler) is built
from a config in code with seeded random weights; nothing is downloaded. The models
are float32 and in eval mode, and a pipeline built twice with the same ``seed`` has
bit-identical weights. Each pipeline denoises a 32×32 image in 6 steps in well under
a second on CPU.

Public API
----------
* :func:`tiny_sd3_pipeline` -> ``diffusers.StableDiffusion3Pipeline``
* :func:`tiny_flux_pipeline` -> ``diffusers.FluxPipeline``
* :func:`sd3_call_kwargs`, :func:`flux_call_kwargs`: typical ``pipe(**kwargs)`` kwargs
  for tiny sizes (``output_type="pt"`` or ``"latent"``).
* :func:`image_token_count`, :func:`text_token_count`: sequence lengths the
  transformer sees for a given call.
* Building blocks: :func:`tiny_clip_tokenizer`, :func:`tiny_t5_tokenizer`,
  :func:`tiny_clip_text_encoder`, :func:`tiny_t5_encoder`, :func:`tiny_vae`.

Sizes
-----
Both VAEs have two blocks, so ``vae_scale_factor = 2`` (image -> latent halves H, W).

* **SD3**: transformer hidden 16 (2 heads × 8), patch 2, 2 joint blocks. Image tokens
  = ``(H/2/2) · (W/2/2)``: 32×32 -> latent 16×16 -> 64 tokens; 32×64 -> 128; 64×64 ->
  256. Text tokens = ``CLIP_MAX_LENGTH`` (16) + ``max_sequence_length``: 32 for
  ``max_sequence_length=16``. Context: two CLIP encoders (hidden 16 each, concatenated
  to 32 = T5 width, so no zero padding is needed) then T5 (d_model 32) along the
  sequence axis; pooled: 16 + 16 = 32 (the two CLIP projections).
* **FLUX**: transformer hidden 16 (2 heads × 8), 1 double + 2 single blocks, latent
  channels 4 packed 2×2 -> ``in_channels = 16``. Image tokens = ``(H/2/2) · (W/2/2)``:
  32×32 -> latent 16×16 -> 8×8 = 64 tokens; 32×64 -> 128; 64×64 -> 256. Text tokens =
  ``max_sequence_length`` (T5 only); pooled = CLIP hidden (32). Height and width must
  be multiples of 4 (``vae_scale_factor * 2``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

__all__ = [
    "CLIP_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "WORDS",
    "OutputType",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "tiny_clip_text_encoder",
    "tiny_t5_encoder",
    "tiny_vae",
    "tiny_sd3_pipeline",
    "tiny_flux_pipeline",
    "tiny_controlnet_pipeline",
    "sd3_call_kwargs",
    "flux_call_kwargs",
    "image_token_count",
    "text_token_count",
]

OutputType = Literal["pt", "latent", "np", "pil"]
_Module = TypeVar("_Module", bound=torch.nn.Module)

CLIP_MAX_LENGTH = 16
"""``model_max_length`` of the CLIP tokenizers (= CLIP ``max_position_embeddings``)."""

T5_MAX_LENGTH = 512
"""``model_max_length`` of the T5 tokenizer (covers SD3's default ``max_sequence_length``
of 256 and FLUX's of 512; the tiny T5 uses relative positions, so any length works)."""

WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "painting",
    "cat", "dog", "horse", "astronaut", "riding", "red", "green", "blue", "yellow",
    "white", "black", "small", "large", "square", "circle", "triangle", "background",
    "mountain", "lake", "sunset", "blurry", "low", "quality", "bad", "ugly",
)  # fmt: skip
"""Words the tiny tokenizers know as whole tokens (anything else still tokenizes:
CLIP falls back to bytes, T5 to characters)."""

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"

# FLUX.1-dev / SD3-medium VAE latent normalisation and the FLUX dynamic-shift settings
_SD3_VAE_SCALING, _SD3_VAE_SHIFT = 1.5305, 0.0609
_FLUX_VAE_SCALING, _FLUX_VAE_SHIFT = 0.3611, 0.1159
_FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge (every occurrence of) the best-ranked adjacent pair."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        first, second = symbols[i], symbols[i + 1]
        merged: list[str] = []
        j = 0
        while j < len(symbols):
            if j + 1 < len(symbols) and symbols[j] == first and symbols[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def _clip_vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Byte-level BPE vocab (every byte, with and without the ``</w>`` end-of-word
    suffix, so no input is ever unknown) plus merges that make each of ``words`` a
    single token.

    Merges are only ever appended (lowest priority), so a merge added for a later word
    cannot change how an earlier word is split: each word is tokenized with the merges
    so far and, while it is still in pieces, its first two pieces get a new merge.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in ranks]


def tiny_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` (byte-level BPE, lower-casing, ``<|startoftext|>`` /
    ``<|endoftext|>``; pad = eos as in SD3/FLUX) over a tiny vocab (~550 tokens).

    Built offline: a ``vocab.json`` and ``merges.txt`` are written to a temporary
    directory and loaded from there.
    """
    vocab, merges = _clip_vocab_and_merges(WORDS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=model_max_length,
            bos_token=_CLIP_BOS,
            eos_token=_CLIP_EOS,
            unk_token=_CLIP_EOS,
            pad_token=_CLIP_EOS,
            local_files_only=True,
        )


def tiny_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A T5-like fast tokenizer: SentencePiece-style Unigram with ``▁`` word-start
    markers, lower-casing, ``</s>`` appended, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2.

    Vocab: the :data:`WORDS` as whole tokens plus single characters (letters, digits,
    punctuation, with and without ``▁``) as a fallback, built with the ``tokenizers``
    library and wrapped in ``transformers.PreTrainedTokenizerFast``.
    """
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -6.0)]
    vocab += [(f"▁{w}", -2.0) for w in WORDS]
    vocab += [(f"▁{c}", -8.0) for c in chars if f"▁{c}" not in dict(vocab)]
    vocab += [(c, -9.0) for c in chars]
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
    )


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for weight init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _ready(module: _Module) -> _Module:
    """float32 (already the construction dtype unless torch's default differs), eval
    mode, no grad."""
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module = module.to(torch.float32)
    module = module.eval()
    module.requires_grad_(False)
    return module


def tiny_clip_text_encoder(
    tokenizer: CLIPTokenizer,
    seed: int,
    *,
    hidden_size: int,
    projection_dim: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Tiny CLIP text encoder (2 layers, 2 heads) matching ``tokenizer``'s vocab and
    special ids; ``CLIPTextModelWithProjection`` when ``projection_dim`` is given
    (SD3), else ``CLIPTextModel`` (FLUX, whose pooled output has width ``hidden_size``)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim if projection_dim is not None else hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output = hidden state at the first eos
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection_dim is not None else CLIPTextModel
    with _seeded(seed):
        return _ready(cls(config))


def tiny_t5_encoder(tokenizer: PreTrainedTokenizerFast, seed: int, *, d_model: int = 32) -> T5EncoderModel:
    """Tiny T5 encoder (2 layers, 4 heads × 8, relative-position attention)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return _ready(T5EncoderModel(config))


def tiny_vae(seed: int, *, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """Tiny ``AutoencoderKL``: 2 blocks (channels 8, 16) -> ``vae_scale_factor = 2``,
    4 latent channels, no (post-)quant conv as in the SD3 / FLUX VAEs."""
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=False,
        )
    return _ready(vae)


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A complete tiny ``StableDiffusion3Pipeline`` with seeded random weights.

    Transformer: ``SD3Transformer2DModel`` (sample_size 16, patch 2, 4 -> 4 channels,
    2 layers, 2 heads × 8 = hidden 16, joint_attention_dim 32, caption_projection_dim
    16, pooled_projection_dim 32). Text: 2 × ``CLIPTextModelWithProjection`` (hidden
    16, projection 16; their penultimate hidden states concatenated = 32 = T5 width,
    their projections concatenated = 32 = pooled width) + ``T5EncoderModel`` (d_model
    32). VAE: :func:`tiny_vae` with SD3's scaling/shift factors. Scheduler:
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

    The default size (no ``height``/``width`` given) is 32×32.
    """
    clip_hidden, clip_proj, t5_width = 16, 16, 32
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with _seeded(seed):
        transformer = _ready(
            SD3Transformer2DModel(
                sample_size=16,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=t5_width,
                caption_projection_dim=16,
                pooled_projection_dim=2 * clip_proj,
            )
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed + 1, scaling_factor=_SD3_VAE_SCALING, shift_factor=_SD3_VAE_SHIFT),
        text_encoder=tiny_clip_text_encoder(tokenizer, seed + 2, hidden_size=clip_hidden, projection_dim=clip_proj),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, seed + 3, hidden_size=clip_hidden, projection_dim=clip_proj),
        tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_t5_encoder(tokenizer_3, seed + 4, d_model=t5_width),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A complete tiny ``FluxPipeline`` with seeded random weights.

    Transformer: ``FluxTransformer2DModel`` (patch 1, in_channels 16 = 4 latent
    channels × 2×2 packing, 1 double + 2 single blocks, 2 heads × 8 = hidden 16,
    joint_attention_dim 32 = T5 width, pooled_projection_dim 32 = CLIP width, guidance
    embeds, RoPE axes (2, 2, 4)). Text: ``CLIPTextModel`` (hidden 32, pooled output) +
    ``T5EncoderModel`` (d_model 32). VAE: :func:`tiny_vae` with FLUX's scaling/shift
    factors. Scheduler: ``FlowMatchEulerDiscreteScheduler`` with FLUX's resolution-
    dependent shift (``use_dynamic_shifting``, base/max shift 0.5/1.15 over image
    sequence lengths 256..4096).

    ``height``/``width`` must be multiples of 4; always pass them (the pipeline's
    default size is 256×256).
    """
    clip_hidden, t5_width = 32, 32
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    with _seeded(seed):
        transformer = _ready(
            FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=2,
                attention_head_dim=8,
                num_attention_heads=2,
                joint_attention_dim=t5_width,
                pooled_projection_dim=clip_hidden,
                guidance_embeds=True,
                axes_dims_rope=(2, 2, 4),
            )
        )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULER),
        vae=tiny_vae(seed + 1, scaling_factor=_FLUX_VAE_SCALING, shift_factor=_FLUX_VAE_SHIFT),
        text_encoder=tiny_clip_text_encoder(tokenizer, seed + 2, hidden_size=clip_hidden),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(tokenizer_2, seed + 3, d_model=t5_width),
        tokenizer_2=tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------
# Call kwargs and sequence lengths
# --------------------------------------------------------------------------------------


def tiny_controlnet_pipeline(family: Literal["sd3", "flux"], seed: int = 0) -> Any:
    """The tiny SD3 or FLUX pipeline as a ``StableDiffusion3ControlNetPipeline`` /
    ``FluxControlNetPipeline`` with a one-block ControlNet of the transformer's widths. The
    ControlNet's output blocks, zero at initialisation in diffusers, get seeded random weights:
    its residuals then change the image (and change with the latent at every step). Call with
    ``control_image=`` (``[1, 3, H, W]`` in [0, 1]) besides the family's call kwargs."""
    base = tiny_sd3_pipeline(seed) if family == "sd3" else tiny_flux_pipeline(seed)
    with _seeded(seed + 5):
        if family == "sd3":
            cn = SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                    caption_projection_dim=16, pooled_projection_dim=32)
        else:
            cn = FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                     pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        with torch.no_grad():
            for p in cn.parameters():
                if not p.any():
                    p.normal_(0.0, 0.3)
    cls = StableDiffusion3ControlNetPipeline if family == "sd3" else FluxControlNetPipeline
    return cls(**base.components, controlnet=_ready(cn))


def sd3_call_kwargs(
    seed: int = 0,
    *,
    prompt: str | list[str] = "a photo of a red cat",
    negative_prompt: str | list[str] | None = "blurry low quality",
    height: int = 32,
    width: int = 32,
    num_inference_steps: int = 6,
    guidance_scale: float = 5.0,
    max_sequence_length: int = 16,
    output_type: OutputType = "pt",
    **extra: Any,
) -> dict[str, Any]:
    """Typical ``StableDiffusion3Pipeline.__call__`` kwargs for the tiny pipeline.

    ``guidance_scale > 1`` enables classifier-free guidance: the transformer then runs
    once per step on the batched ``[uncond, cond]`` input. ``output_type="pt"`` gives
    images ``[B, 3, height, width]`` in [0, 1]; ``"latent"`` gives the unscaled latents
    ``[B, 4, height/2, width/2]``. ``height``/``width`` must be multiples of 4.
    ``extra`` is merged in last (any other pipeline argument).
    """
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "max_sequence_length": max_sequence_length,
        "output_type": output_type,
        "generator": torch.Generator().manual_seed(seed),
        **extra,
    }


def flux_call_kwargs(
    seed: int = 0,
    *,
    prompt: str | list[str] = "a photo of a red cat",
    negative_prompt: str | list[str] | None = None,
    true_cfg_scale: float = 1.0,
    height: int = 32,
    width: int = 32,
    num_inference_steps: int = 6,
    guidance_scale: float = 3.5,
    max_sequence_length: int = 16,
    output_type: OutputType = "pt",
    **extra: Any,
) -> dict[str, Any]:
    """Typical ``FluxPipeline.__call__`` kwargs for the tiny pipeline.

    ``guidance_scale`` is the *embedded* (distilled) guidance fed to the transformer.
    With ``true_cfg_scale > 1`` and a ``negative_prompt``, the transformer runs twice
    per step (cond, then uncond; two separate batch-B calls). ``output_type="pt"`` gives
    images ``[B, 3, height, width]``; ``"latent"`` gives the *packed* latents
    ``[B, (height/4)·(width/4), 16]``. ``height``/``width`` must be multiples of 4.
    ``extra`` is merged in last.
    """
    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "true_cfg_scale": true_cfg_scale,
        "max_sequence_length": max_sequence_length,
        "output_type": output_type,
        "generator": torch.Generator().manual_seed(seed),
    }
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    kwargs.update(extra)
    return kwargs


def image_token_count(pipe: StableDiffusion3Pipeline | FluxPipeline, height: int, width: int) -> int:
    """Number of image tokens the pipeline's transformer sees for a ``height×width`` image."""
    lh, lw = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    patch = 2 if isinstance(pipe, FluxPipeline) else pipe.transformer.config.patch_size  # FLUX: 2×2 packing
    return (lh // patch) * (lw // patch)


def text_token_count(pipe: StableDiffusion3Pipeline | FluxPipeline, max_sequence_length: int) -> int:
    """Number of text (context) tokens: SD3 = CLIP length + T5 length, FLUX = T5 length."""
    if isinstance(pipe, FluxPipeline):
        return max_sequence_length
    return pipe.tokenizer_max_length + max_sequence_length
