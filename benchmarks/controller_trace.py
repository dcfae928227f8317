"""What the controller predicted against what each call got wrong, call by call.

    python benchmarks/controller_trace.py --model flux --sampler flux_nocfg --steps 20,50
    python benchmarks/controller_trace.py --model sd3 --sampler sd3_cfg --steps 28 --options '{"tolerance": 0.05}'
    python benchmarks/controller_trace.py --options '{"controller": "error_latest_rate", "tolerance": 0.1}'  # a variant

One specdiff generation per step count (the protocol's sampler, 8 prompts in one batch, seed
0 or ``--seed``, plain-FX path), with every call also run by the untouched transformer on the same inputs:
the call's *true* error is ``||out - out_full|| / ||out_full||`` over every token of the
batch (what the cache got wrong on that call, given the latent it was handed). A full call
computes exactly (true error 0); what it returns differs from the untouched transformer's output
by the hindsight correction, printed as ``correction`` (relative to the output). Printed per
main-run call of branch 0: sigma, kind, the controller's predicted error and the error it
measured on the call (``StepRecord.predicted`` / ``.measured``), the true error; then the sums
``sum_i e_i * (sigma_i - sigma_{i+1})`` over the generation and over ``sigma > 0.5``, the image
PSNR against full compute (mean / worst prompt) and the FLOPs.

The predicted error is the relative error of the tokens a sparse call leaves out; the true
error is over every token, computed ones included, so with 10 % of the tokens computed the two
agree when the prediction is right and the computed tokens are close to exact.

Each sparse call's per-token outputs (``proj_out``'s) are also split against the untouched
transformer's: over the tokens it computed, the error of their fresh outputs and the error
their last outputs (what they would have reused) would have made; over the tokens it left out,
the error of what they reused (each relative to the full outputs of the same rows). A computed
token attends to the others' cached (extrapolated) keys and values, so its fresh output is not
exact: where it is no closer than its last one, computing it bought nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]


def _sample(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def trace(name: str, sampler: str, steps: int, options: dict, prompts: int = 8, seed: int = 0) -> dict:
    """One traced generation; returns the per-call rows and the summary."""
    import specdiff_fx
    from benchmarks import protocol
    from specdiff_fx.runtime.executor import GraphExecutor
    from specdiff_zoo import load_shapes_dit

    model = load_shapes_dit(name)
    noise = protocol.initial_noise(seed, protocol.image_size(model), prompts)
    texts = protocol.PROMPTS[:prompts]
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model.transformer), backend="specdiff",
                             options={**options, "inductor": False})
    errors: list[float] = []
    rows_of: list[dict | None] = []
    sparse: dict = {}
    truth: dict = {}
    run_sparse = GraphExecutor.run_sparse

    def spy(self, args, key, inputs):  # the computed tokens and what they would have reused
        reused = inputs.history[0].clone()  # the runtime updates the history in place afterwards
        out = run_sparse(self, args, key, inputs)
        sparse.update(idx=inputs.idx, reused=reused, tokens=out.tokens.detach().clone())
        return out

    hook = model.transformer.proj_out.register_forward_hook(lambda m, a, o: truth.__setitem__("tokens", o.detach()))

    def call(*args: Any, **kwargs: Any) -> Any:
        sparse.clear()
        out = compiled(*args, **kwargs)
        full = _sample(model.transformer(*args, **kwargs))
        errors.append(float((_sample(out) - full).norm() / full.norm()))
        rows_of.append(_split(sparse, truth["tokens"]) if sparse.get("idx") is not None else None)
        return out

    with torch.no_grad():
        ref = protocol.SAMPLERS[sampler](model, model.transformer, texts, noise, steps)
        specdiff_fx.reset()
        GraphExecutor.run_sparse = spy
        try:
            images = protocol.SAMPLERS[sampler](model, call, texts, noise, steps)
        finally:
            GraphExecutor.run_sparse = run_sparse
            hook.remove()
    rep = specdiff_fx.last_generation()
    psnr, _ = protocol._per_image(images, ref)
    main = rep.main_steps  # in call order, as ``errors``
    rows = []
    for st, err, split in zip(main, errors, rows_of):
        if st.branch != 0:
            continue
        full = st.kind == "full"  # computed exactly; it differs by the hindsight correction only
        rows.append({"step": st.step, "kind": st.kind, "sigma": st.sigma, "true": 0.0 if full else err,
                     **({"correction": err} if full else {}),
                     "predicted": st.predicted, "measured": st.measured, "note": st.note, **(split or {})})
    sig = [r["sigma"] for r in rows] + [0.0]
    weighted = [r["true"] * (sig[i] - sig[i + 1]) for i, r in enumerate(rows)]
    return {"model": name, "sampler": sampler, "steps": steps, "rows": rows,
            "kinds": "".join(r["kind"][0] for r in rows), "flops": rep.flops_fraction,
            "mean_psnr": sum(psnr) / len(psnr), "worst_psnr": min(psnr), "psnr": psnr,
            "error_integral": sum(weighted),
            "error_integral_early": sum(w for w, r in zip(weighted, rows) if r["sigma"] > 0.5)}


def _split(sparse: dict, full: torch.Tensor) -> dict:
    """Relative errors of one sparse call's per-token outputs against the full ones: the
    computed tokens' fresh and last outputs, and the left-out tokens' reused ones."""
    idx, tokens, reused = sparse["idx"], sparse["tokens"].float(), sparse["reused"].float()
    full = full.float()
    computed = torch.zeros(full.shape[:2], dtype=torch.bool, device=full.device)
    computed.scatter_(1, idx.to(full.device), True)

    def rel(x: torch.Tensor, rows: torch.Tensor) -> float:
        w = rows.unsqueeze(-1).to(full.dtype)
        return float(((x - full) * w).norm() / (full * w).norm().clamp_min(1e-12))

    return {"computed_fresh": rel(tokens, computed), "computed_reused": rel(reused, computed),
            "left_out_reused": rel(reused, ~computed)}


def report(t: dict) -> str:
    lines = [f"{t['model']} {t['sampler']} {t['steps']} steps: PSNR {t['mean_psnr']:.2f} / {t['worst_psnr']:.2f} dB, "
             f"FLOPs {t['flops']:.1%}, sum e*dsigma {t['error_integral']:.4f} (sigma > 0.5: "
             f"{t['error_integral_early']:.4f})", f"  calls {t['kinds']}"]
    for r in t["rows"]:
        pred, meas = (f"{r[key]:.3f}" if r[key] is not None else "  -  " for key in ("predicted", "measured"))
        split = (f"  computed: fresh {r['computed_fresh']:.3f} reused {r['computed_reused']:.3f}; left out "
                 f"{r['left_out_reused']:.3f}") if "computed_fresh" in r else ""
        lines.append(f"  {r['step']:3d} {r['kind'][0]} sigma {r['sigma']:.3f}  predicted {pred}  measured {meas}  "
                     + (f"correction {r['correction']:.3f}" if "correction" in r else f"true {r['true']:.3f}") + split
                     + ("" if r["predicted"] is not None else f"  ({r['note'] or 'first call'})"))
    split = [r for r in t["rows"] if "computed_fresh" in r]
    if split:
        med = {key: statistics.median(r[key] for r in split)
               for key in ("computed_fresh", "computed_reused", "left_out_reused")}
        lines.append(f"  sparse calls ({len(split)}), medians: computed tokens' fresh outputs {med['computed_fresh']:.3f}, "
                     f"their last outputs {med['computed_reused']:.3f}; left-out tokens' {med['left_out_reused']:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux")
    p.add_argument("--sampler", default="flux_nocfg")
    p.add_argument("--steps", default="20,50", help="comma-separated step counts")
    p.add_argument("--options", default="{}", help="specdiff options as JSON")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="the protocol's noise seed (default 0)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT))
    from benchmarks import controller_variants

    controller_variants.register()  # so that --options may select a variant's controller
    from benchmarks import protocol

    if a.sampler not in protocol.SAMPLERS:
        p.error(f"--sampler {a.sampler!r}: one of {', '.join(protocol.SAMPLERS)}")
    out = []
    for steps in (int(s) for s in a.steps.split(",")):
        t = trace(a.model, a.sampler, steps, json.loads(a.options), a.prompts, a.seed)
        print(report(t), flush=True)
        out.append(t)
    return out


if __name__ == "__main__":
    main()
