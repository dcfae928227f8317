"""The rule the defaults are chosen by, applied to protocol runs on the tune models.

    python benchmarks/choose_defaults.py RUN/protocol.json ... [--current '{}']

Each argument is a ``protocol.json`` written by ``benchmarks/protocol.py --write`` on the
*tune* split; a file with held-out rows is refused (a default is never picked from a held-out
number). Every specdiff options dict found in the files is a candidate; runs of the same
candidate with other seeds (or other models) add up, cell by cell. ``--current`` names the
options of the present defaults (``'{}'``: the library's defaults as they are).

The rule, per candidate, over the cells it shares with the current defaults (a cell: model,
sampler, step count and seed; its images are the prompts):

1. every (model, sampler, steps) cell keeps a mean PSNR >= ``--min-mean`` (30 dB; or the cell's
   own mean floor, below);
2. every image >= ``--min-image`` (25 dB; or the cell's own image floor, below) wherever the
   current defaults keep every image of that cell >= it;
3. among the candidates that pass and cover every cell the current defaults cover, the one with
   the fewest cells that hold an image under the image floor wins (the floors are targets: where
   the current defaults miss one, a candidate that meets it comes first, whatever its FLOPs);
   then the fewest FLOPs (the mean over cells of the executed share; the current defaults win a
   tie), unless a candidate that spends more buys its fidelity at a better rate than the
   ``tolerance`` knob would: among those candidates, in order of FLOPs, a costlier one replaces
   the choice so far where its mean of cells is higher by more than ``--exchange`` dB per point
   of FLOPs it spends above it (and by more than ``--min-gain`` dB), and neither its lowest cell
   nor its worst image is lower. The default rate, 3 dB per point, is twice what the knob trades
   around the defaults on the tune models (about 1.5 dB per point; BENCHMARKS.md), so that a
   neighbouring setting of the knob does not win by this step, and one that lies well above the
   knob's curve does: the rule still spends the tune models' margin on FLOPs along the knob, but
   no longer drops an option that buys fidelity far more cheaply than the knob does.

Where the files hold the ``bf16`` reference on a cell (``--methods eager,bf16``: full compute in
bfloat16, the precision the pipelines run in, against the same float32 reference), that cell's
floors are no stricter than what it meets: the mean floor is ``min(--min-mean, bf16's mean)`` and
the image floor ``min(--min-image, bf16's worst image)`` over the seeds it ran. On a model whose
trajectories fork under bfloat16's rounding an image floor above that would be decided by which
images happen to fork, not by the candidate's error.

A candidate failing on a cell fails whatever it does not cover; one that passes on fewer cells
than the current defaults cover is reported as incomplete and not chosen. Prints one line per
candidate and the choice; returns the choice's options (``None`` if nothing passes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

Cell = tuple[str, str, int, int]  # model, sampler, steps, seed
Floors = dict[tuple[str, str, int], tuple[float, float]]  # (model, sampler, steps) -> (mean, image) floor


def _normalise(params: dict) -> str:
    """The candidate's key: its options as the library resolves them, without those equal to
    the library's defaults (and without ``inductor``, which changes no number the rule reads).
    Given a row's ``config`` (every option as the library resolved it when the run ran), a run
    made before a default changed keeps the options it ran with; given its ``params`` alone,
    they are read with today's defaults."""
    from specdiff_fx.config import SpecDiffConfig

    def plain(d: dict) -> dict:  # as JSON reads them back (a tuple is a list in a run's file)
        return json.loads(json.dumps(d))

    defaults = plain(SpecDiffConfig().to_dict())
    try:
        resolved = plain(SpecDiffConfig.from_options(params).to_dict())
    except (ValueError, TypeError):  # an option of another library version: kept as written
        resolved = plain(params)
    kept = {k: v for k, v in resolved.items() if k != "inductor" and (k not in defaults or defaults[k] != v)}
    return json.dumps(kept, sort_keys=True)


def load(paths: Sequence[str | Path], commits: set[str] | None = None,
         bf16: dict[tuple[str, str, int], list[float]] | None = None) -> dict[str, dict[Cell, dict]]:
    """``{candidate: {cell: {"psnr": [...per prompt], "flops": share}}}`` from the files (and the
    library commits they were run on, added to ``commits``: a candidate is its options, so runs
    of different library code must not be mixed; the ``bf16`` rows' PSNR per (model, sampler,
    steps), added to ``bf16``)."""
    out: dict[str, dict[Cell, dict]] = defaultdict(dict)
    for path in paths:
        run = json.loads(Path(path).read_text())
        if commits is not None:
            git = run.get("git") or {}
            commits.add(f"{str(git.get('commit'))[:10]}{' (dirty)' if git.get('dirty') else ''}")
        seeds = list(run["seeds"])
        for r in run["results"]:
            if r.get("split") != "tune":
                raise SystemExit(f"{path}: a {r.get('split')!r} row ({r['model']}): the rule reads tune runs only")
            if r["kind"] == "bf16" and bf16 is not None:
                bf16.setdefault((r["model"], r["sampler"], int(r["steps"])), []).extend(r["psnr"])
            if r["kind"] != "specdiff" or r.get("batch1"):
                continue
            psnr = list(r["psnr"])
            if len(psnr) % len(seeds):
                raise SystemExit(f"{path}: {len(psnr)} images for {len(seeds)} seeds in {r['model']} {r['sampler']}")
            per_seed = len(psnr) // len(seeds)  # images are seed-major: every prompt of a seed, then the next seed
            flops = r["flops_per_generation"] if len(r.get("flops_per_generation") or []) == len(seeds) \
                else [r["flops"]] * len(seeds)
            key = _normalise(r.get("config") or r["params"])  # a run before the rows had their config: its params
            for i, seed in enumerate(seeds):
                cell = (r["model"], r["sampler"], int(r["steps"]), int(seed))
                if cell in out[key]:
                    hint = "" if "config" in r else (" (its rows record no resolved config: if a default changed since"
                                                     " the run, two of its option sets may now read as one)")
                    raise SystemExit(f"{path}: {key} {cell} was measured twice{hint}")
                out[key][cell] = {"psnr": psnr[i * per_seed:(i + 1) * per_seed], "flops": float(flops[i])}
    return dict(out)


def floors_from(bf16: dict[tuple[str, str, int], list[float]], min_mean: float = 30.0,
                min_image: float = 25.0) -> Floors:
    """Per (model, sampler, steps) cell with ``bf16`` PSNR (:func:`load`): ``(min(min_mean, its
    mean), min(min_image, its worst image))`` over every seed it ran (runs of other seeds add up)."""
    return {c: (min(min_mean, sum(p) / len(p)), min(min_image, min(p))) for c, p in bf16.items() if p}


def reference_floors(paths: Sequence[str | Path], min_mean: float = 30.0, min_image: float = 25.0) -> Floors:
    """:func:`floors_from` the ``bf16`` rows of the files."""
    bf16: dict[tuple[str, str, int], list[float]] = {}
    load(paths, bf16=bf16)
    return floors_from(bf16, min_mean, min_image)


def judge(cells: dict[Cell, dict], current: dict[Cell, dict], min_mean: float, min_image: float,
          floors: Floors | None = None) -> dict:
    """One candidate against the rule (see the module docstring); ``floors``: the cells' own floors
    (:func:`reference_floors`), where a cell has none ``min_mean`` / ``min_image``."""
    floors = floors or {}
    by_cell: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    cur_by_cell: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for (m, s, n, seed), c in cells.items():
        if (m, s, n, seed) in current:
            by_cell[(m, s, n)] += c["psnr"]
    for (m, s, n, seed), c in current.items():
        if (m, s, n, seed) in cells:
            cur_by_cell[(m, s, n)] += c["psnr"]
    fails = []
    floor = {cell: floors.get(cell, (min_mean, min_image)) for cell in by_cell}
    below = sum(min(psnr) < floor[cell][1] for cell, psnr in by_cell.items())
    for cell, psnr in sorted(by_cell.items()):
        mean, (mean_floor, image_floor) = sum(psnr) / len(psnr), floor[cell]
        if mean < mean_floor:
            fails.append(f"{' '.join(map(str, cell))}: mean {mean:.2f} dB")
        if min(cur_by_cell[cell]) >= image_floor and min(psnr) < image_floor:
            fails.append(f"{' '.join(map(str, cell))}: an image at {min(psnr):.2f} dB")
    shared = [c for c in cells if c in current]
    means = [sum(p) / len(p) for p in by_cell.values()]
    return {
        "cells": len(by_cell), "seeds": sorted({c[3] for c in shared}),
        "mean": sum(means) / len(means) if means else float("nan"),
        "lowest_cell": min(means) if means else float("nan"),
        "worst_image": min(min(p) for p in by_cell.values()) if by_cell else float("nan"),
        "flops": sum(cells[c]["flops"] for c in shared) / len(shared) if shared else float("nan"),
        "fails": fails, "complete": set(current) <= set(cells), "cells_below_floor": below,
    }


#: dB of mean of cells per point of FLOPs a costlier candidate must gain to win (step 3)
EXCHANGE = 3.0
#: and at least this many dB: about how far the mean of the 9 tune cells moves with nothing changed but
#: the error controller's probe draw (0.46 dB across four draws; BENCHMARKS.md, "A cell's noise floor")
MIN_GAIN = 0.5


def worth_its_flops(dearer: dict, cheaper: dict, exchange: float = EXCHANGE, min_gain: float = MIN_GAIN) -> bool:
    """Whether the verdict ``dearer`` buys its FLOPs above ``cheaper``'s at a better rate than
    ``exchange`` dB of mean of cells per point (and more than ``min_gain`` dB), no lower on the
    lowest cell or the worst image."""
    gain = dearer["mean"] - cheaper["mean"]
    points = 100 * (dearer["flops"] - cheaper["flops"])
    return (gain > max(min_gain, exchange * points) and dearer["lowest_cell"] >= cheaper["lowest_cell"]
            and dearer["worst_image"] >= cheaper["worst_image"])


def choose(runs: dict[str, dict[Cell, dict]], current: str, min_mean: float = 30.0,
           min_image: float = 25.0, floors: Floors | None = None, exchange: float = EXCHANGE,
           min_gain: float = MIN_GAIN) -> tuple[str | None, dict[str, dict]]:
    """``(chosen candidate or None, {candidate: verdict})``."""
    if current not in runs:
        raise SystemExit(f"the current defaults {current} are in none of the runs")
    verdicts = {k: judge(cells, runs[current], min_mean, min_image, floors) for k, cells in runs.items()}
    passing = [k for k, v in verdicts.items() if not v["fails"] and v["complete"]]
    if not passing:
        return None, verdicts
    fewest_below = min(verdicts[k]["cells_below_floor"] for k in passing)
    by_flops = sorted((k for k in passing if verdicts[k]["cells_below_floor"] == fewest_below),
                      key=lambda k: (round(verdicts[k]["flops"], 6), k != current))
    chosen = by_flops[0]
    for k in by_flops[1:]:
        if worth_its_flops(verdicts[k], verdicts[chosen], exchange, min_gain):
            chosen = k
    return chosen, verdicts


def main(argv: Sequence[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="protocol.json files of tune runs")
    p.add_argument("--current", default="{}", help="the present defaults' options as JSON (default: '{}')")
    p.add_argument("--min-mean", type=float, default=30.0)
    p.add_argument("--min-image", type=float, default=25.0)
    p.add_argument("--exchange", type=float, default=EXCHANGE,
                   help="dB of mean of cells per point of FLOPs a costlier passing candidate must gain (default: %(default)s)")
    p.add_argument("--min-gain", type=float, default=MIN_GAIN,
                   help="and at least this many dB (default: %(default)s)")
    args = p.parse_args(argv)
    current = _normalise(json.loads(args.current))
    commits: set[str] = set()
    bf16: dict[tuple[str, str, int], list[float]] = {}
    runs = load(args.runs, commits, bf16)
    print(f"runs of {len(args.runs)} file(s), library commit(s) {', '.join(sorted(commits))}"
          + ("  -- more than one: make sure the library code is the same" if len(commits) > 1 else ""))
    floors = floors_from(bf16, args.min_mean, args.min_image)
    for cell, (mean_floor, image_floor) in sorted(floors.items()):
        if (mean_floor, image_floor) != (args.min_mean, args.min_image):
            print(f"  floors of {' '.join(map(str, cell))} from its bf16 reference: mean {mean_floor:.2f} dB, "
                  f"image {image_floor:.2f} dB")
    chosen, verdicts = choose(runs, current, args.min_mean, args.min_image, floors, args.exchange, args.min_gain)
    for key, v in sorted(verdicts.items(), key=lambda kv: (not kv[1]["cells"], kv[1]["flops"])):
        state = "fails: " + "; ".join(v["fails"]) if v["fails"] else ("passes" if v["complete"] else
                                                                        "passes where measured (incomplete)")
        mark = "*" if key == chosen else " "
        print(f"{mark} {key:32s} {v['cells']:3d} cells, seeds {v['seeds']}: {v['mean']:.2f} / {v['lowest_cell']:.2f} / "
              f"{v['worst_image']:.2f} dB, {100 * v['flops']:.1f} % FLOPs, {v['cells_below_floor']} cell(s) with an "
              f"image under its floor; {state}")
    print(f"choice: {chosen if chosen is not None else 'none passes'}")
    return json.loads(chosen) if chosen is not None else None


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
