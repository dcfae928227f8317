"""What one cached call costs the final image, call by call.

    python benchmarks/call_sensitivity.py --model sd3 --sampler sd3_cfg --steps 20
    python benchmarks/call_sensitivity.py --model flux --sampler flux_nocfg --steps 28 --seeds 0,1

For every main-run call ``t >= 1`` of a generation (the protocol's sampler and prompts, one batch
per seed, plain-FX path): every call full except call ``t``, which is a skip (every token reuses
its output of call ``t - 1``, which was exact) or, with ``--mode sparse``, a sparse call of the
default ``k``. Printed per call: sigma, the step it feeds (``dt = sigma_t - sigma_{t+1}``), the
error of reusing ``e_t = ||F_t - F_{t-1}|| / ||F_t||`` (measured by the runtime on the
all-full run, over the tokens a sparse call would leave out), the same for the velocity the
sampler steps with where it guides (``F`` combined as the pipeline combines it: batched CFG
with the model's guidance scale, true CFG with the protocol's), the final images' mean and
worst PSNR against full compute, and ``r / (dt * e_t)``: the images' relative error ``r`` per
unit of latent error the call put in. Where that ratio is flat across calls, the final images
weigh an error by the step it feeds and nothing else; where one call's is far above its
neighbours', the image is at a fork there (a tiny, structured change decides a detail).

The decisions come from a scripted policy (``"controller": "scripted"``, registered here, not
in the library): the runtime, token choice and caches are the library's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from specdiff_fx.control import Decision, register_policy, policies  # noqa: E402
from specdiff_fx.control.error import ErrorControlled  # noqa: E402


class Scripted(ErrorControlled):
    """Decisions read from :attr:`pattern`, one letter per main-run call (``f`` full, ``c`` sparse,
    ``s`` skip; call 0 is always full). Measures like the error controller, so each call's
    error of caching is recorded."""

    name = "scripted"
    pattern = "f"

    def may_skip(self) -> bool:
        return True

    def sparse_limit(self) -> int:
        return 1

    def decide(self, state: Any, view: Any) -> Decision:
        letter = type(self).pattern[view.step]
        if letter == "f":
            return Decision.full("scripted")
        if letter == "s":
            return Decision.skip("scripted")
        if letter == "c":
            return Decision.sparse(self.config.num_computed(self.num_tokens), "scripted")
        raise ValueError(f"pattern letter {letter!r} at call {view.step}")


def register() -> None:
    if Scripted.name not in policies():
        register_policy(Scripted)


def _sample(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _guided(outputs: list[torch.Tensor], sampler: str, model: Any) -> list[torch.Tensor] | None:
    """The velocity each step of ``sampler`` moves with (``None``: it does not guide)."""
    from benchmarks import protocol

    if sampler == "flux_nocfg":
        return None
    n = protocol.CALLS_PER_STEP[sampler]
    return [protocol.guide(sampler, model, outputs[i:i + n]) for i in range(0, len(outputs), n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def sensitivity(name: str, sampler: str, steps: int, seeds: Sequence[int], mode: str = "s",
                prompts: int = 8) -> dict:
    import specdiff_fx
    from benchmarks import protocol
    from specdiff_zoo import load_shapes_dit

    register()
    model = load_shapes_dit(name)
    sample = protocol.SAMPLERS[sampler]
    texts = protocol.PROMPTS[:prompts]
    noise = {s: protocol.initial_noise(s, protocol.image_size(model), prompts) for s in seeds}
    plain = copy.deepcopy(model.transformer)
    outputs: list[torch.Tensor] = []  # each call's output, recorded by a hook on the plain transformer
    hook = plain.register_forward_hook(lambda m, a, o: outputs.append(_sample(o).detach().clone()))
    refs = {}
    guided_err: list[list[float]] = []  # per seed, per call from the second on
    try:
        for s in seeds:
            outputs.clear()
            refs[s] = sample(model, plain, texts, noise[s], steps)
            guided = _guided(outputs, sampler, model)
            if guided is not None:
                guided_err.append([_rel(guided[t], guided[t - 1]) for t in range(1, len(guided))])
    finally:
        hook.remove()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model.transformer), backend="specdiff",
                             options={"controller": "scripted", "inductor": False})

    def run(pattern: str) -> dict:
        Scripted.pattern = pattern
        psnrs, rel, reports = [], [], []
        for s in seeds:
            specdiff_fx.reset()
            out = sample(model, compiled, texts, noise[s], steps)
            reports.append(specdiff_fx.last_generation())
            psnrs += protocol._per_image(out, refs[s])[0]
            rel.append(_rel(refs[s], out) if refs[s].norm() > 0 else 0.0)
        return {"mean_psnr": statistics.fmean(psnrs), "worst_psnr": min(psnrs), "rel": statistics.fmean(rel),
                "psnr": psnrs, "reports": reports}

    base = run("f" * steps)
    calls = [st for st in base["reports"][0].steps if st.kind != "speculative" and st.branch == 0]
    sigmas = [st.sigma for st in calls] + [0.0]
    measured: dict[int, list[float]] = {}
    for rep in base["reports"]:
        for st in rep.steps:
            if st.branch == 0 and st.measured is not None:
                measured.setdefault(st.step, []).append(st.measured)
    rows = []
    for t in range(1, steps):
        r = run("f" * t + mode + "f" * (steps - t - 1))
        e = statistics.fmean(measured[t]) if t in measured else float("nan")
        dt = sigmas[t] - sigmas[t + 1]
        rows.append({"call": t, "sigma": sigmas[t], "dt": dt, "e": e,
                     "e_guided": statistics.fmean(g[t - 1] for g in guided_err) if guided_err else None,
                     "mean_psnr": r["mean_psnr"], "worst_psnr": r["worst_psnr"], "rel": r["rel"],
                     "per_dt_e": r["rel"] / (dt * e) if dt > 0 and e > 0 else float("nan")})
    return {"model": name, "sampler": sampler, "steps": steps, "seeds": list(seeds), "mode": mode,
            "all_full": {k: base[k] for k in ("mean_psnr", "worst_psnr", "rel")}, "rows": rows}


def show(res: dict) -> None:
    what = {"s": "a skip", "c": "a sparse call"}[res["mode"]]
    print(f"{res['model']} {res['sampler']} {res['steps']} steps, seeds {res['seeds']}: every call full but one, "
          f"{what} (all full: {res['all_full']['mean_psnr']:.2f} dB)")
    print(" call  sigma     dt    e_t  e_guided   PSNR mean / worst   r (images)  r / (dt e_t)")
    for r in res["rows"]:
        g = f"{r['e_guided']:.3f}" if r["e_guided"] is not None else "  -  "
        print(f" {r['call']:>4}  {r['sigma']:.3f}  {r['dt']:.3f}  {r['e']:.3f}  {g:>8}   {r['mean_psnr']:6.2f} / "
              f"{r['worst_psnr']:6.2f}    {r['rel']:.2e}    {r['per_dt_e']:7.2f}")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd3")
    p.add_argument("--sampler", default="sd3_cfg")
    p.add_argument("--steps", default="20", help="comma-separated step counts")
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--mode", choices=("s", "c"), default="s", help="s: the one call skipped; c: sparse")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = []
    with torch.no_grad():
        for n in (int(x) for x in a.steps.split(",")):
            res = sensitivity(a.model, a.sampler, n, [int(s) for s in a.seeds.split(",")], a.mode, a.prompts)
            show(res)
            out.append(res)
    return out


if __name__ == "__main__":
    main()
