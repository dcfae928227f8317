"""Procedural "coloured shapes" text-to-image dataset.

Every sample is a 32x32 RGB image with values in ``[-1, 1]`` showing one or two
flat-coloured shapes (circle, square, triangle) at a named position on a plain
or gently graded background, together with a caption drawn from a small fixed
vocabulary, e.g. ``"a red circle at the left on a navy background"`` or
``"red square at top and blue triangle at bottom on white background"``.

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
"""Height and width of every image, in pixels."""

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
"""Named positions as ``(row, col)`` pixel centres."""

PAIR_POSITIONS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
"""Position pairs used for two-shape images (chosen so shapes never overlap)."""

HALF_SIZE_RANGE: tuple[float, float] = (4.0, 5.5)
"""Range of the shapes' half extent in pixels."""

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


def _shape_mask(shape: str, row: float, col: float, half: float) -> np.ndarray:
    """Boolean ``[H, W]`` mask of a shape centred at ``(row, col)``."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
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
    """Draw a description into a ``[3, 32, 32]`` float32 tensor in ``[-1, 1]``.

    The description is the dict returned by :func:`sample`; its optional
    ``gradient`` entry ``(amplitude, angle)`` shades the background linearly.
    """
    base = np.asarray(BACKGROUND_COLOURS[description["background"]], dtype=np.float32)
    amp, angle = description.get("gradient", (0.0, 0.0))
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    ramp = (np.cos(angle) * (xx / (IMAGE_SIZE - 1) - 0.5) + np.sin(angle) * (yy / (IMAGE_SIZE - 1) - 0.5)) * 2.0
    img = base[:, None, None] + np.float32(amp) * ramp[None]
    for s in description["shapes"]:
        mask = _shape_mask(s["shape"], s["row"], s["col"], s["half"])
        colour = np.asarray(SHAPE_COLOURS[s["colour"]], dtype=np.float32)
        img = np.where(mask[None], colour[:, None, None], img)
    img = np.clip(img, 0.0, 1.0) * 2.0 - 1.0
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))


def sample_description(rng: np.random.Generator, p_two: float = 0.3) -> dict[str, Any]:
    """Draw a random structured description (no pixels).

    Keys: ``background`` (name), ``gradient`` ``(amplitude, angle)``, and
    ``shapes``: a list of one or two dicts with ``shape``, ``colour``,
    ``position``, ``row``, ``col`` (pixel centre, jittered by up to 1 px) and
    ``half`` (half extent in pixels).
    """
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
                "row": float(row + rng.uniform(-1.0, 1.0)),
                "col": float(col + rng.uniform(-1.0, 1.0)),
                "half": float(rng.uniform(*HALF_SIZE_RANGE)),
            }
        )
    return {"background": bg, "gradient": gradient, "shapes": shapes}


def sample(rng: np.random.Generator, p_two: float = 0.3) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """Draw one example: ``(image [3, 32, 32] in [-1, 1], caption, description)``."""
    desc = sample_description(rng, p_two=p_two)
    return render(desc), caption_for(desc), desc


def make_dataset(n: int, seed: int, p_two: float = 0.3) -> tuple[torch.Tensor, list[str], list[dict[str, Any]]]:
    """Draw ``n`` examples deterministically from ``seed``.

    Returns ``(images [n, 3, 32, 32], captions, descriptions)``.
    """
    rng = np.random.default_rng(seed)
    images, captions, descs = [], [], []
    for _ in range(n):
        img, cap, desc = sample(rng, p_two=p_two)
        images.append(img)
        captions.append(cap)
        descs.append(desc)
    return torch.stack(images), captions, descs


def description_from_caption(caption: str) -> dict[str, Any]:
    """Parse a caption produced by :func:`caption_for` back into a description.

    Shapes are placed at the nominal position centre with the mid-range size,
    which is all :func:`shape_colour_check` needs.
    """
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
                    "row": float(row),
                    "col": float(col),
                    "half": float(sum(HALF_SIZE_RANGE) / 2),
                }
            )
    return {"background": bg, "gradient": (0.0, 0.0), "shapes": shapes}


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


_CORNERS: tuple[tuple[int, int], ...] = (
    (2, 2),
    (2, IMAGE_SIZE - 3),
    (IMAGE_SIZE - 3, 2),
    (IMAGE_SIZE - 3, IMAGE_SIZE - 3),
)


def colour_report(image: torch.Tensor, description: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Expected vs. observed colour names for every checked region of an image.

    Keys are ``"shape0"``, ``"shape1"`` (3x3 window at each described shape
    centre) and ``"background"`` (mean of the four corner windows, which cancels
    any linear gradient); values are ``(expected, observed)``.
    """
    report: dict[str, tuple[str, str]] = {}
    for i, s in enumerate(description["shapes"]):
        report[f"shape{i}"] = (s["colour"], dominant_colour(image, s["row"], s["col"]))
    img = image.detach().float()
    meds = [
        img[:, r - 1 : r + 2, c - 1 : c + 2].reshape(3, -1).median(dim=1).values for r, c in _CORNERS
    ]
    bg_rgb = ((torch.stack(meds).mean(dim=0).clamp(-1, 1) + 1) / 2).cpu().numpy()
    report["background"] = (description["background"], nearest_colour(bg_rgb))
    return report


def shape_colour_check(image: torch.Tensor, description: dict[str, Any], check_background: bool = True) -> bool:
    """Whether an image shows the described colours in the described regions.

    ``image`` is ``[3, 32, 32]`` in ``[-1, 1]``; ``description`` is a dict as
    returned by :func:`sample` or :func:`description_from_caption`. Every shape's
    centre window must be nearest to its named colour and, if
    ``check_background``, the corners must be nearest to the background colour.
    """
    report = colour_report(image, description)
    if not check_background:
        report.pop("background")
    return all(expected == observed for expected, observed in report.values())
