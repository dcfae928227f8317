"""Train a shapes-zoo DiT (SD3 or FLUX family) with rectified flow on one CPU core.

Pixel-space training on the procedural coloured-shapes dataset
(:mod:`specdiff_zoo.data`): ``x_t = (1 - t) x0 + t eps``, target
``v = eps - x0``, ``t ~ sigmoid(N(0, 1))`` (logit-normal), MSE loss. The text
encoder (:mod:`specdiff_zoo.text`) is trained jointly; captions are dropped
to ``""`` with probability ``--p-uncond`` for classifier-free guidance. The
transformer calling convention (timestep scaling, FLUX packing and ids) is the
one of :func:`specdiff_zoo.call_transformer`.

Writes ``shapes_<family>.safetensors`` (EMA weights, keys prefixed
``transformer.`` / ``text_encoder.``), ``shapes_<family>.json`` and
``shapes_<family>_loss.csv`` into ``--out``.

Usage::

    python scripts/train_shapes.py --family sd3 --steps 1400 --seed 0 --out specdiff_zoo/weights
    python scripts/train_shapes.py --family flux --steps 900 --seed 0 --out specdiff_zoo/weights
    python scripts/train_shapes.py --family sd3 --quick --out /tmp/zoo_quick
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("sd3", "flux"), default="sd3")
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
                   help="continue from shapes_<family>.safetensors of an earlier run (its JSON must sit beside it)")
    args = p.parse_args(argv)
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
    """Draw a training batch: images ``[B, 3, 32, 32]`` and (possibly dropped) token ids."""
    images, captions = [], []
    for _ in range(args.batch_size):
        desc = sample_description(rng, p_two=args.p_two)
        images.append(render(desc))
        captions.append("" if rng.random() < args.p_uncond else caption_for(desc))
    return torch.stack(images), tokenize_batch(captions)


def save(
    path_prefix: Path,
    transformer: torch.nn.Module,
    text_encoder: ShapesTextEncoder,
    meta: dict[str, Any],
) -> None:
    """Write ``<prefix>.safetensors`` (float32, prefixed keys) and ``<prefix>.json``."""
    from safetensors.torch import save_file

    state = {f"transformer.{k}": v.detach().float().contiguous() for k, v in transformer.state_dict().items()}
    state.update({f"text_encoder.{k}": v.detach().float().contiguous() for k, v in text_encoder.state_dict().items()})
    save_file(state, str(path_prefix.with_suffix(".safetensors")), metadata={"format": "pt"})
    path_prefix.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def evaluate(model: ShapesModel, n: int, seed: int, guidance_scale: float, png: Path | None) -> float:
    """Fraction of ``n`` held-out prompts whose samples pass :func:`shape_colour_check`."""
    _, captions, descs = make_dataset(n, seed=10_000 + seed)
    images = model.sample(captions, num_steps=28, guidance_scale=guidance_scale, seed=seed)
    passed = [shape_colour_check(img, d) for img, d in zip(images, descs)]
    if png is not None:
        save_grid(images, png)
    return float(np.mean(passed))


def save_grid(images: torch.Tensor, path: Path, cols: int = 8, scale: int = 4) -> None:
    """Save ``[B, 3, 32, 32]`` images in ``[-1, 1]`` as an upscaled PNG grid."""
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

    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    family = args.family

    tcfg = default_transformer_config(family)
    transformer = build_transformer(family, tcfg)
    te_cfg = TextEncoderConfig(vocab_size=len(VOCAB), max_len=MAX_LEN, width=128, num_layers=1, num_heads=4,
                               joint_attention_dim=tcfg["joint_attention_dim"],
                               pooled_dim=tcfg["pooled_projection_dim"])
    text_encoder = ShapesTextEncoder(te_cfg)
    previous: dict[str, Any] | None = None
    if args.init is not None:
        from safetensors.torch import load_file

        state = load_file(str(args.init))
        transformer.load_state_dict({k[12:]: v for k, v in state.items() if k.startswith("transformer.")})
        text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
        previous = json.loads(args.init.with_suffix(".json").read_text())["train"]
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    ema_t = copy.deepcopy(transformer).requires_grad_(False)
    ema_e = copy.deepcopy(text_encoder).requires_grad_(False)
    ema_pairs = list(zip(list(ema_t.parameters()) + list(ema_e.parameters()), params))

    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / f"shapes_{family}"
    losses: list[float] = []
    t0 = time.time()
    with open(args.out / f"shapes_{family}_loss.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "loss"])
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
            writer.writerow([step, f"{losses[-1]:.6f}"])
            if (step + 1) % args.log_every == 0 or step == args.steps - 1:
                fh.flush()
                recent = float(np.mean(losses[-args.log_every :]))
                print(f"step {step + 1}/{args.steps} loss {recent:.4f} lr {lr_at(step, args):.2e} "
                      f"elapsed {time.time() - t0:.0f}s", flush=True)
    train_seconds = time.time() - t0

    n_tr = sum(p.numel() for p in transformer.parameters())
    n_te = sum(p.numel() for p in text_encoder.parameters())
    meta: dict[str, Any] = {
        "family": family,
        "transformer_class": "SD3Transformer2DModel" if family == "sd3" else "FluxTransformer2DModel",
        "transformer": tcfg,
        "text_encoder": te_cfg.to_dict(),
        "vocab": list(VOCAB),
        "max_len": MAX_LEN,
        "pad_id": 0,
        "image_size": 32,
        "pixel_range": [-1.0, 1.0],
        "timestep_convention": TIMESTEP_CONVENTION[family],
        "input_layout": ("[B,3,32,32] pixels, patch_size=2" if family == "sd3" else
                         "[B,256,12] tokens = FluxPipeline._pack_latents of [B,3,32,32]; img_ids (0,row,col) "
                         "[256,3]; txt_ids zeros [12,3]"),
        "sampler": "Euler, FlowMatchEulerDiscreteScheduler(shift=1.0) sigmas, x += (sigma_next - sigma) * v",
        "cfg": ("batched [uncond, cond] call, empty caption '' as uncond" if family == "sd3" else
                "single call with guidance embedding"),
        "default_guidance_scale": args.guidance_scale,
        "weights": "EMA",
        "train": {
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
            "quick": bool(args.quick),
            "init_from": None if args.init is None else args.init.name,
            "previous_stage": previous,
            "total_steps": args.steps + (0 if previous is None else previous.get("total_steps", previous["steps"])),
        },
        "param_counts": {"transformer": n_tr, "text_encoder": n_te},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    ema_t.eval()
    ema_e.eval()
    if args.eval_prompts > 0:
        model = ShapesModel(family=family, transformer=ema_t, text_encoder=ema_e, config=meta)
        rate = evaluate(model, args.eval_prompts, args.seed, args.guidance_scale, args.png)
        meta["quality_check"] = {"prompts": args.eval_prompts, "num_steps": 28, "pass_rate": rate}
        print(f"colour-check pass rate: {rate:.2f}", flush=True)
    save(prefix, ema_t, ema_e, meta)
    print(f"saved {prefix}.safetensors ({train_seconds:.0f}s training, final loss "
          f"{meta['train']['final_loss']:.4f})", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
