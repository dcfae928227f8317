"""Train a shapes-zoo DiT (SD3 or FLUX family) with rectified flow on one CPU core.

Pixel-space training on the procedural coloured-shapes dataset
(:mod:`specdiff_zoo.data`): ``x_t = (1 - t) x0 + t eps``, target
``v = eps - x0``, ``t ~ sigmoid(N(0, 1))`` (logit-normal), MSE loss. The text
encoder (:mod:`specdiff_zoo.text`) is trained jointly; captions are dropped
to ``""`` with probability ``--p-uncond`` for classifier-free guidance. The
transformer calling convention (timestep scaling, FLUX packing and ids) is the
one of :func:`specdiff_zoo.call_transformer`.

Writes ``shapes_<name>.safetensors`` (EMA weights, keys prefixed
``transformer.`` / ``text_encoder.``), ``shapes_<name>.json`` and
``shapes_<name>_loss.csv`` into ``--out`` (``--name`` defaults to the family).
``--image-size`` (32 or 64) sets the pixel resolution, ``--num-layers``,
``--num-single-layers`` (FLUX), ``--heads`` and ``--head-dim`` override the
architecture of :func:`specdiff_zoo.default_transformer_config`; with none of
them the run is the setup of the tune models ``sd3`` and ``flux``. Weights are stored as float32 unless
that would exceed 14 MiB, then as float16 (``--weights-dtype``); the final
colour check runs on the stored (rounded) weights. The JSON records the
architecture, every hyper-parameter, the command line and the git commit.

Usage::

    python scripts/train_shapes.py --family sd3 --steps 1400 --seed 0 --out specdiff_zoo/weights
    python scripts/train_shapes.py --family flux --steps 900 --seed 0 --out specdiff_zoo/weights
    python scripts/train_shapes.py --family sd3 --quick --out /tmp/zoo_quick
    python scripts/train_shapes.py --family flux --name x --image-size 64 --quick --out /tmp/zoo_quick

``--init`` continues an earlier run's weights with a fresh optimizer and schedule
(a second stage); for FLUX the stage may change ``--image-size`` (train at 32
px, then continue at 64 px). The JSON keeps every earlier stage's record under
``train.previous_stage``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from specdiff_zoo import (  # noqa: E402
    IMAGE_SIZE,
    TIMESTEP_CONVENTION,
    ShapesModel,
    build_transformer,
    call_transformer,
    default_transformer_config,
)
from specdiff_zoo.data import (  # noqa: E402
    MAX_LEN,
    VOCAB,
    make_dataset,
    render,
    sample_description,
    caption_for,
    shape_colour_check,
    tokenize_batch,
)
from specdiff_zoo.text import ShapesTextEncoder, TextEncoderConfig  # noqa: E402

DEFAULTS: dict[str, dict[str, Any]] = {
    "sd3": {"steps": 1400, "batch_size": 32, "lr": 1e-3, "guidance_scale": 4.0},
    "flux": {"steps": 900, "batch_size": 32, "lr": 1e-3, "guidance_scale": 3.5},
}
"""Per-family default training hyper-parameters (sized for ~20 min on one core)."""

MAX_WEIGHTS_BYTES: int = 15 * 2**20
"""Size limit of a shipped ``.safetensors``; ``--weights-dtype auto`` keeps float32 only with 1 MiB to spare."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd3", "flux"), default="sd3")
    p.add_argument("--name", default=None, help="output stem shapes_<name> (default: the family)")
    p.add_argument("--image-size", type=int, choices=(32, 64), default=IMAGE_SIZE,
                   help="pixel resolution; (size/2)^2 image tokens")
    p.add_argument("--num-layers", type=int, default=None, help="SD3 joint blocks / FLUX double-stream blocks")
    p.add_argument("--num-single-layers", type=int, default=None, help="FLUX single-stream blocks")
    p.add_argument("--heads", type=int, default=None, help="attention heads")
    p.add_argument("--head-dim", type=int, default=None, help="attention head dimension")
    p.add_argument("--axes-dims-rope", type=int, nargs=3, default=None,
                   help="FLUX rotary dims (id, row, col) summing to the head dim (derived if omitted)")
    p.add_argument("--weights-dtype", choices=("auto", "float32", "float16"), default="auto",
                   help="storage dtype of the .safetensors (auto: float32 if it stays under 14 MiB, else float16)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (family default if omitted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "specdiff_zoo" / "weights")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decay floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--p-uncond", type=float, default=0.1, help="caption dropout probability (CFG)")
    p.add_argument("--p-two", type=float, default=0.3, help="probability of a two-shape image")
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-prompts", type=int, default=24, help="prompts for the final colour check (0: skip)")
    p.add_argument("--png", type=Path, default=None, help="optional PNG grid of final samples")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 tiny steps, no eval")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from shapes_<name>.safetensors of an earlier run with the same transformer config "
                        "(its JSON must sit beside it; its loss CSV, if there, is carried over); the image size may "
                        "change where the config does not depend on it (FLUX: progressive resolution)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.name = args.name or args.family
    if args.family == "sd3" and args.num_single_layers is not None:
        p.error("--num-single-layers applies to --family flux only")
    if args.family == "sd3" and args.axes_dims_rope is not None:
        p.error("--axes-dims-rope applies to --family flux only")
    d = DEFAULTS[args.family]
    if args.quick:
        args.steps = args.steps or 3
        args.batch_size = args.batch_size or 4
        args.warmup = min(args.warmup, 1)
        args.eval_prompts = 0
    args.steps = args.steps or d["steps"]
    args.batch_size = args.batch_size or d["batch_size"]
    args.lr = args.lr or d["lr"]
    args.guidance_scale = d["guidance_scale"]
    return args


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def draw_batch(rng: np.random.Generator, args: argparse.Namespace) -> tuple[torch.Tensor, torch.LongTensor]:
    """Draw a training batch: images ``[B, 3, S, S]`` (``S = --image-size``) and (possibly dropped) token ids."""
    images, captions = [], []
    for _ in range(args.batch_size):
        desc = sample_description(rng, p_two=args.p_two, image_size=args.image_size)
        images.append(render(desc))
        captions.append("" if rng.random() < args.p_uncond else caption_for(desc))
    return torch.stack(images), tokenize_batch(captions)


def save(
    path_prefix: Path,
    transformer: torch.nn.Module,
    text_encoder: ShapesTextEncoder,
    meta: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``<prefix>.safetensors`` (``dtype``, prefixed keys) and ``<prefix>.json``."""
    from safetensors.torch import save_file

    state = {f"transformer.{k}": v.detach().to(dtype).contiguous() for k, v in transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v.detach().to(dtype).contiguous() for k, v in text_encoder.state_dict().items()})
    save_file(state, str(path_prefix.with_suffix(".safetensors")), metadata={"format": "pt"})
    path_prefix.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def storage_dtype(choice: str, num_params: int) -> torch.dtype:
    """Storage dtype for ``--weights-dtype``: ``auto`` picks float16 when float32 would exceed 14 MiB."""
    if choice == "auto":
        return torch.float32 if 4 * num_params <= MAX_WEIGHTS_BYTES - 2**20 else torch.float16
    return {"float32": torch.float32, "float16": torch.float16}[choice]


def git_commit() -> str | None:
    """``HEAD`` of the checkout this script runs from, with ``-dirty`` if it has changes (``None`` outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def evaluate(model: ShapesModel, n: int, seed: int, guidance_scale: float, png: Path | None) -> float:
    """Fraction of ``n`` held-out prompts whose samples pass :func:`shape_colour_check`."""
    _, captions, descs = make_dataset(n, seed=10_000 + seed, image_size=model.image_size)
    images = model.sample(captions, num_steps=28, guidance_scale=guidance_scale, seed=seed)
    passed = [shape_colour_check(img, d) for img, d in zip(images, descs)]
    if png is not None:
        save_grid(images, png)
    return float(np.mean(passed))


def save_grid(images: torch.Tensor, path: Path, cols: int = 8, scale: int = 4) -> None:
    """Save ``[B, 3, H, W]`` images in ``[-1, 1]`` as an upscaled PNG grid."""
    from PIL import Image

    from specdiff_zoo import to_uint8

    x = to_uint8(images).numpy()
    b, h, w, _ = x.shape
    rows = (b + cols - 1) // cols
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = x[i]
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training and write the artefacts; returns the metadata dict."""
    import diffusers

    commit = git_commit()  # at start: the code this run trains with
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    family = args.family

    tcfg = default_transformer_config(family, image_size=args.image_size, num_layers=args.num_layers,
                                      num_single_layers=args.num_single_layers, heads=args.heads,
                                      head_dim=args.head_dim, axes_dims_rope=args.axes_dims_rope)
    transformer = build_transformer(family, tcfg)
    te_cfg = TextEncoderConfig(vocab_size=len(VOCAB), max_len=MAX_LEN, width=128, num_layers=1, num_heads=4,
                               joint_attention_dim=tcfg["joint_attention_dim"],
                               pooled_dim=tcfg["pooled_projection_dim"])
    text_encoder = ShapesTextEncoder(te_cfg)
    previous: dict[str, Any] | None = None
    previous_rows: list[list[str]] = []
    if args.init is not None:
        from safetensors.torch import load_file

        prev_meta = json.loads(args.init.with_suffix(".json").read_text())
        if prev_meta["transformer"] != tcfg:  # SD3's config holds the image size, FLUX's does not
            raise SystemExit(f"--init {args.init}: its transformer config {prev_meta['transformer']} differs "
                             f"from this run's {tcfg}")
        state = load_file(str(args.init))
        transformer.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("transformer.")})
        text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
        previous = prev_meta["train"]
        prev_csv = args.init.with_name(args.init.stem + "_loss.csv")
        if prev_csv.is_file():  # read now: the output CSV may be the same file
            with open(prev_csv, newline="") as fh:
                previous_rows = list(csv.reader(fh))[1:]
    step_offset = 0 if previous is None else previous.get("total_steps", previous["steps"])
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    ema_t = copy.deepcopy(transformer).requires_grad_(False)
    ema_e = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_pairs = list(zip(list(ema_t.parameters()) + list(ema_e.parameters()), params))

    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / f"shapes_{args.name}"
    n_tokens = (args.image_size // 2) ** 2
    print(f"training shapes_{args.name}: {family}, {args.image_size} px ({n_tokens} image tokens), "
          f"{sum(p.numel() for p in transformer.parameters())} transformer params, {args.steps} steps x "
          f"batch {args.batch_size}, seed {args.seed}, {args.num_threads} thread(s)", flush=True)
    losses: list[float] = []
    t0 = time.time()
    with open(args.out / f"shapes_{args.name}_loss.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss"])
        writer.writerows(previous_rows)
        for step in range(args.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            x0, ids = draw_batch(rng, args)
            b = x0.shape[0]
            noise = torch.randn_like(x0)
            t = torch.sigmoid(torch.randn(b))
            xt = (1 - t.view(b, 1, 1, 1)) * x0 + t.view(b, 1, 1, 1) * noise
            hidden, pooled = text_encoder(ids)
            guidance = torch.empty(b).uniform_(1.0, 5.0) if family == "flux" else None
            pred = call_transformer(family, transformer, xt, hidden, pooled, t, guidance=guidance)
            loss = torch.nn.functional.mse_loss(pred, noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in ema_pairs:
                    pe.lerp_(p, 1 - decay)
            losses.append(loss.item())
            writer.writerow([step_offset + step, f"{losses[-1]:.6f}"])
            if (step + 1) % args.log_every == 0 or step == args.steps - 1:
                fh.flush()
                recent = float(np.mean(losses[-args.log_every :]))
                elapsed = time.time() - t0
                print(f"step {step + 1}/{args.steps} loss {recent:.4f} lr {lr_at(step, args):.2e} "
                      f"elapsed {elapsed:.0f}s ({elapsed / (step + 1):.2f} s/step)", flush=True)
    train_seconds = time.time() - t0

    n_tr = sum(p.numel() for p in transformer.parameters())
    n_te = sum(p.numel() for p in text_encoder.parameters())
    n_state = sum(v.numel() for m in (ema_t, ema_e) for v in m.state_dict().values())
    wdtype = storage_dtype(args.weights_dtype, n_state)
    size, grid = args.image_size, args.image_size // 2
    meta: dict[str, Any] = {
        "name": args.name,
        "family": family,
        "transformer_class": "SD3Transformer2DModel" if family == "sd3" else "FluxTransformer2DModel",
        "transformer": tcfg,
        "text_encoder": te_cfg.to_dict(),
        "vocab": list(VOCAB),
        "max_len": MAX_LEN,
        "pad_id": 0,
        "image_size": size,
        "num_image_tokens": n_tokens,
        "pixel_range": [-1.0, 1.0],
        "timestep_convention": TIMESTEP_CONVENTION[family],
        "input_layout": (f"[B,3,{size},{size}] pixels, patch_size=2" if family == "sd3" else
                         f"[B,{n_tokens},12] tokens = FluxPipeline._pack_latents of [B,3,{size},{size}]; "
                         f"img_ids (0,row,col) [{n_tokens},3] on a {grid}x{grid} grid; txt_ids zeros [{MAX_LEN},3]"),
        "sampler": "Euler, FlowMatchEulerDiscreteScheduler(shift=1.0) sigmas, x += (sigma_next - sigma) * v",
        "cfg": ("batched [uncond, cond] call, empty caption '' as uncond" if family == "sd3" else
                "single call with guidance embedding"),
        "default_guidance_scale": args.guidance_scale,
        "weights": "EMA",
        "weights_dtype": str(wdtype).replace("torch.", ""),
        "architecture_overrides": {
            "num_layers": args.num_layers,
            "num_single_layers": args.num_single_layers,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "axes_dims_rope": args.axes_dims_rope,
        },
        "train": {
            "command": shlex.join(["python", "scripts/train_shapes.py", *args.argv]),
            "git_commit": commit,
            "image_size": size,
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "min_lr_ratio": args.min_lr_ratio,
            "weight_decay": args.weight_decay,
            "ema_decay": args.ema_decay,
            "p_uncond": args.p_uncond,
            "p_two": args.p_two,
            "timestep_sampling": "logit-normal(0, 1)",
            "num_threads": args.num_threads,
            "seconds": round(train_seconds, 1),
            "final_loss": float(np.mean(losses[-50:])),
            "seconds_per_step": round(train_seconds / args.steps, 3),
            "quick": bool(args.quick),
            "init_from": None if args.init is None else args.init.name,
            "previous_stage": previous,
            "total_steps": step_offset + args.steps,
        },
        "param_counts": {"transformer": n_tr, "text_encoder": n_te},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    if previous is not None:
        meta["train"]["loss_csv_note"] = (
            f"shapes_{args.name}_loss.csv holds every stage; rows from step {step_offset} on are this stage"
            if previous_rows else
            f"shapes_{args.name}_loss.csv holds this stage only (step index offset by {step_offset})")
    ema_t.eval()
    ema_e.eval()
    with torch.no_grad():  # evaluate exactly what is stored
        for v in list(ema_t.state_dict().values()) + list(ema_e.state_dict().values()):
            if v.is_floating_point():
                v.copy_(v.to(wdtype).float())
    if args.eval_prompts > 0:
        model = ShapesModel(family=family, transformer=ema_t, text_encoder=ema_e, config=meta, name=args.name,
                            image_size=size)
        t_eval = time.time()
        rate = evaluate(model, args.eval_prompts, args.seed, args.guidance_scale, args.png)
        meta["quality_check"] = {"prompts": args.eval_prompts, "num_steps": 28, "pass_rate": rate,
                                 "prompt_seed": 10_000 + args.seed, "sample_seed": args.seed,
                                 "guidance_scale": args.guidance_scale}
        print(f"colour-check pass rate: {rate:.2f} ({time.time() - t_eval:.0f}s)", flush=True)
    save(prefix, ema_t, ema_e, meta, dtype=wdtype)
    nbytes = prefix.with_suffix(".safetensors").stat().st_size
    print(f"saved {prefix}.safetensors ({nbytes / 2**20:.1f} MiB {meta['weights_dtype']}, "
          f"{train_seconds:.0f}s training, final loss {meta['train']['final_loss']:.4f})", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
