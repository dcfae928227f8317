"""Procedural "coloured shapes" text-to-image dataset.

Every sample is a square RGB image (32x32 by default) with values in ``[-1, 1]``
showing one or two flat-coloured shapes (circle, square, triangle) at a named
position on a plain or gently graded background, together with a caption drawn
from a small fixed vocabulary, e.g. ``"a red circle at the left on a navy
background"`` or ``"red square at top and blue triangle at bottom on white
background"``.

The layout is defined on a 32-px canvas (:data:`POSITIONS`,
:data:`HALF_SIZE_RANGE`, 1-px jitter); other sizes (any positive multiple of
32, ``image_size``) scale positions, sizes and jitter by ``image_size / 32``,
so a seed draws the same scene at every size. The random draws do not depend
on the size, and at 32 px the images are those of the original 32-px-only
generator.

Everything is deterministic given a seed: :func:`sample` draws one example from
a :class:`numpy.random.Generator`, :func:`make_dataset` draws ``n`` examples
from ``numpy.random.default_rng(seed)``.

The module also provides the word-level tokenizer used by the zoo text encoder
(:func:`tokenize`, pad id 0, fixed length :data:`MAX_LEN`), and the colour
probe :func:`dominant_colour` used by the quality checks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

IMAGE_SIZE: int = 32
"""Default height and width of the images, in pixels (the canvas the layout constants refer to)."""

SHAPE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
"""Named shape colours as RGB in ``[0, 1]``."""

BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
    "navy": (0.08, 0.12, 0.40),
}
"""Named background colours as RGB in ``[0, 1]`` (disjoint from shape colours)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape kinds."""

POSITIONS: dict[str, tuple[int, int]] = {
    "left": (16, 7),
    "right": (16, 25),
    "top": (7, 16),
    "bottom": (25, 16),
    "center": (16, 16),
}
"""Named positions as ``(row, col)`` pixel centres on the 32-px canvas."""

PAIR_POSITIONS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
"""Position pairs used for two-shape images (chosen so shapes never overlap)."""

HALF_SIZE_RANGE: tuple[float, float] = (4.0, 5.5)
"""Range of the shapes' half extent in pixels on the 32-px canvas."""

MAX_LEN: int = 12
"""Fixed token length produced by :func:`tokenize`."""

PAD_ID: int = 0
"""Token id used for padding (and for the empty caption)."""

_SPECIAL: tuple[str, ...] = ("<pad>", "<unk>")
_WORDS: tuple[str, ...] = (
    "a",
    "at",
    "the",
    "on",
    "and",
    "background",
    *SHAPE_COLOURS,
    *BACKGROUND_COLOURS,
    *SHAPES,
    *POSITIONS,
)

VOCAB: tuple[str, ...] = _SPECIAL + _WORDS
"""The fixed vocabulary; index in this tuple is the token id."""

_WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
UNK_ID: int = _WORD_TO_ID["<unk>"]


def tokenize(caption: str, max_len: int = MAX_LEN) -> torch.LongTensor:
    """Map a caption to a fixed-length LongTensor of token ids.

    Words are lower-cased and split on whitespace; unknown words map to
    ``<unk>``; the sequence is truncated or right-padded with :data:`PAD_ID` to
    ``max_len``. The empty caption ``""`` (used for classifier-free guidance)
    maps to an all-pad sequence.
    """
    ids = [_WORD_TO_ID.get(w, UNK_ID) for w in caption.lower().replace(",", " ").split()]
    ids = ids[:max_len] + [PAD_ID] * max(0, max_len - len(ids))
    return torch.tensor(ids, dtype=torch.long)


def tokenize_batch(captions: list[str], max_len: int = MAX_LEN) -> torch.LongTensor:
    """Tokenize a list of captions into a ``[B, max_len]`` LongTensor."""
    return torch.stack([tokenize(c, max_len) for c in captions])


def caption_for(description: dict[str, Any]) -> str:
    """Render the caption for a structured description (see :func:`sample`)."""
    shapes = description["shapes"]
    bg = description["background"]
    if len(shapes) == 1:
        s = shapes[0]
        return f"a {s['colour']} {s['shape']} at the {s['position']} on a {bg} background"
    a, b = shapes
    return (
        f"{a['colour']} {a['shape']} at {a['position']} and "
        f"{b['colour']} {b['shape']} at {b['position']} on {bg} background"
    )


def scale_for(image_size: int) -> int:
    """Integer factor from the 32-px layout canvas to ``image_size`` (a positive multiple of 32)."""
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0 or image_size % IMAGE_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {IMAGE_SIZE}, got {image_size!r}")
    return int(image_size) // IMAGE_SIZE


def description_size(description: dict[str, Any]) -> int:
    """Image size a description's pixel coordinates refer to (its ``image_size`` entry, else 32)."""
    return int(description.get("image_size", IMAGE_SIZE))


def _shape_mask(shape: str, row: float, col: float, half: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean ``[image_size, image_size]`` mask of a shape centred at ``(row, col)``."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    dy, dx = yy - row, xx - col
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Upward-pointing isosceles triangle filling the [-half, half] box.
        frac = (dy + half) / (2.0 * half)  # 0 at apex row, 1 at base row
        return (frac >= 0.0) & (frac <= 1.0) & (np.abs(dx) <= frac * half)
    raise ValueError(f"unknown shape {shape!r}")


def render(description: dict[str, Any]) -> torch.Tensor:
    """Draw a description into a ``[3, S, S]`` float32 tensor in ``[-1, 1]``.

    The description is the dict returned by :func:`sample_description`; ``S``
    is its ``image_size`` entry (32 when absent) and its pixel coordinates refer
    to that size. Its optional ``gradient`` entry ``(amplitude, angle)`` shades
    the background linearly across the image.
    """
    size = description_size(description)
    scale_for(size)
    base = np.asarray(BACKGROUND_COLOURS[description["background"]], dtype=np.float32)
    amp, angle = description.get("gradient", (0.0, 0.0))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ramp = (np.cos(angle) * (xx / (size - 1) - 0.5) + np.sin(angle) * (yy / (size - 1) - 0.5)) * 2.0
    img = base[:, None, None] + np.float32(amp) * ramp[None]
    for s in description["shapes"]:
        mask = _shape_mask(s["shape"], s["row"], s["col"], s["half"], size)
        colour = np.asarray(SHAPE_COLOURS[s["colour"]], dtype=np.float32)
        img = np.where(mask[None], colour[:, None, None], img)
    img = np.clip(img, 0.0, 1.0) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))


def sample_description(rng: np.random.Generator, p_two: float = 0.3, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Draw a random structured description (no pixels) for an ``image_size`` image.

    Keys: ``background`` (name), ``gradient`` ``(amplitude, angle)``, and
    ``shapes``: a list of one or two dicts with ``shape``, ``colour``,
    ``position``, ``row``, ``col`` (pixel centre, jittered by up to 1 px of the
    32-px canvas) and ``half`` (half extent in pixels), all in pixels of
    ``image_size``. Sizes other than 32 also get an ``image_size`` key (32-px
    descriptions keep their original keys). The generator is advanced
    identically for every size.
    """
    scale = scale_for(image_size)
    bg = str(rng.choice(list(BACKGROUND_COLOURS)))
    if rng.random() < 0.5:
        gradient = (0.0, 0.0)
    else:
        gradient = (float(rng.uniform(0.03, 0.12)), float(rng.uniform(0.0, 2.0 * np.pi)))
    if rng.random() < p_two:
        positions = list(PAIR_POSITIONS[int(rng.integers(len(PAIR_POSITIONS)))])
        if rng.random() < 0.5:
            positions.reverse()
    else:
        positions = [str(rng.choice(list(POSITIONS)))]
    shapes = []
    for pos in positions:
        row, col = POSITIONS[pos]
        shapes.append(
            {
                "shape": str(rng.choice(SHAPES)),
                "colour": str(rng.choice(list(SHAPE_COLOURS))),
                "position": pos,
                "row": float((row + rng.uniform(-1.0, 1.0)) * scale),
                "col": float((col + rng.uniform(-1.0, 1.0)) * scale),
                "half": float(rng.uniform(*HALF_SIZE_RANGE) * scale),
            }
        )
    desc: dict[str, Any] = {"background": bg, "gradient": gradient, "shapes": shapes}
    if image_size != IMAGE_SIZE:
        desc["image_size"] = int(image_size)
    return desc


def sample(
    rng: np.random.Generator, p_two: float = 0.3, image_size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """Draw one example: ``(image [3, S, S] in [-1, 1], caption, description)`` with ``S = image_size``."""
    desc = sample_description(rng, p_two=p_two, image_size=image_size)
    return render(desc), caption_for(desc), desc


def make_dataset(
    n: int, seed: int, p_two: float = 0.3, image_size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Draw ``n`` examples deterministically from ``seed``.

    Returns ``(images [n, 3, S, S], captions, descriptions)`` with ``S =
    image_size``; captions do not depend on the size.
    """
    rng = np.random.default_rng(seed)
    images, captions, descs = [], [], []
    for _ in range(n):
        img, cap, desc = sample(rng, p_two=p_two, image_size=image_size)
        images.append(img)
        captions.append(cap)
        descs.append(desc)
    return torch.stack(images), captions, descs


def description_from_caption(caption: str, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """Parse a caption produced by :func:`caption_for` back into a description.

    Shapes are placed at the nominal position centre with the mid-range size
    (scaled to ``image_size``), which is all :func:`shape_colour_check` needs.
    """
    scale = scale_for(image_size)
    words = caption.lower().split()
    bg = next(w for w in words if w in BACKGROUND_COLOURS)
    shapes = []
    for i, w in enumerate(words):
        if w in SHAPES:
            colour = words[i - 1]
            pos = next(x for x in words[i + 1 :] if x in POSITIONS)
            row, col = POSITIONS[pos]
            shapes.append(
                {
                    "shape": w,
                    "colour": colour,
                    "position": pos,
                    "row": float(row * scale),
                    "col": float(col * scale),
                    "half": float(sum(HALF_SIZE_RANGE) / 2 * scale),
                }
            )
    desc: dict[str, Any] = {"background": bg, "gradient": (0.0, 0.0), "shapes": shapes}
    if image_size != IMAGE_SIZE:
        desc["image_size"] = int(image_size)
    return desc


ALL_COLOURS: dict[str, tuple[float, float, float]] = {**SHAPE_COLOURS, **BACKGROUND_COLOURS}
"""Every named colour (shape and background), used to classify pixels."""


def nearest_colour(rgb: np.ndarray | torch.Tensor) -> str:
    """Name of the palette colour nearest (Euclidean, in ``[0, 1]`` RGB) to ``rgb``."""
    v = np.asarray(rgb, dtype=np.float32).reshape(3)
    names = list(ALL_COLOURS)
    table = np.asarray([ALL_COLOURS[k] for k in names], dtype=np.float32)
    return names[int(np.argmin(((table - v) ** 2).sum(axis=1)))]


def dominant_colour(image: torch.Tensor, row: float, col: float, radius: int = 1) -> str:
    """Named colour of the per-channel median of a square window of an image.

    ``image`` is ``[3, H, W]`` in ``[-1, 1]``; the window spans
    ``2 * radius + 1`` pixels around pixel ``(row, col)``.
    """
    r, c = int(row), int(col)
    win = image[:, max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1]
    med = win.detach().float().reshape(3, -1).median(dim=1).values
    return nearest_colour(((med.clamp(-1, 1) + 1) / 2).cpu().numpy())


def _corners(image_size: int) -> tuple[tuple[int, int], ...]:
    """Centres of the four background probe windows, ``2 * scale`` pixels in from each edge."""
    near = 2 * scale_for(image_size)
    far = image_size - 1 - near
    return ((near, near), (near, far), (far, near), (far, far))


def colour_report(image: torch.Tensor, description: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Expected vs. observed colour names for every checked region of an image.

    ``image`` is ``[3, S, S]`` with ``S`` a multiple of 32 and the description's
    coordinates in pixels of ``S``. Keys are ``"shape0"``, ``"shape1"``
    (window at each described shape centre) and ``"background"`` (mean of the
    four corner windows, which cancels any linear gradient); values are
    ``(expected, observed)``. Windows are ``2 * scale + 1`` pixels wide with
    ``scale = S / 32`` (3x3 at 32 px).
    """
    size = int(image.shape[-1])
    if image.shape[-2] != size:
        raise ValueError(f"expected a square image, got shape {tuple(image.shape)}")
    if description_size(description) != size:
        raise ValueError(f"description is for {description_size(description)} px, image is {size} px")
    rad = scale_for(size)
    report: dict[str, tuple[str, str]] = {}
    for i, s in enumerate(description["shapes"]):
        report[f"shape{i}"] = (s["colour"], dominant_colour(image, s["row"], s["col"], radius=rad))
    img = image.detach().float()
    meds = [
        img[:, r - rad : r + rad + 1, c - rad : c + rad + 1].reshape(3, -1).median(dim=1).values
        for r, c in _corners(size)
    ]
    bg_rgb = ((torch.stack(meds).mean(dim=0).clamp(-1, 1) + 1) / 2).cpu().numpy()
    report["background"] = (description["background"], nearest_colour(bg_rgb))
    return report


def shape_colour_check(image: torch.Tensor, description: dict[str, Any], check_background: bool = True) -> bool:
    """Whether an image shows the described colours in the described regions.

    ``image`` is ``[3, S, S]`` in ``[-1, 1]``; ``description`` is a dict as
    returned by :func:`sample` or :func:`description_from_caption` for the same
    size (see :func:`colour_report`). Every shape's
    centre window must be nearest to its named colour and, if
    ``check_background``, the corners must be nearest to the background colour.
    """
    report = colour_report(image, description)
    if not check_background:
        report.pop("background")
    return all(expected == observed for expected, observed in report.values())
