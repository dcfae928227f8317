"""How far a protocol cell moves when nothing changes but the error controller's probe draw.

    python benchmarks/probe_seed_spread.py --offsets 0,1,2 --out DIR -- \\
        --split tune --models sd3,flux --steps 20,28,50 --seeds 0,1 --threads 1
    python benchmarks/probe_seed_spread.py --merge DIR/offset_0,DIR/offset_1,DIR/offset_2

A sparse call computes ``k`` tokens, a quarter of them drawn at random among the tokens the score
leaves out (:func:`specdiff_fx.schedule.choose_tokens`, seeded with the branch's step): their
fresh outputs measure the error of caching, and the controller decides the next calls on it. A
different draw is an equally valid run of the same library: it measures a slightly different
error, the controller may place a full call one step earlier or later, and the images follow.
This runs ``benchmarks/protocol.py`` (the arguments after ``--``; its specdiff methods) once per
offset, with every draw's seed shifted by the offset (0: the library as it ships), writes each
run under ``OUT/offset_K`` and prints one table: per cell, each run's mean / worst PSNR and FLOPs
and their spread (largest minus smallest), then the same for the mean over the cells. A
difference between two settings smaller than this spread is not a finding.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def probe_seed_offset(offset: int) -> Iterator[list[int]]:
    """Every probe draw inside the block seeded ``seed + offset``; yields the seeds of the draws
    made (token choices with at least one probe: without, the seed decides nothing)."""
    from specdiff_fx import schedule

    original, seeds = schedule.choose_tokens, []

    def shifted(score, k, probes=0, seed=0, groups=None):
        if probes > 0:
            seeds.append(seed + offset)
        return original(score, k, probes, seed + offset, groups)

    schedule.choose_tokens = shifted
    try:
        yield seeds
    finally:
        schedule.choose_tokens = original


def rows(path: Path) -> dict[tuple, dict]:
    """A run's specdiff results by (model, sampler, steps, method)."""
    data = json.loads((path / "protocol.json").read_text())
    return {(r["model"], r["sampler"], r["steps"], r["method"]): r for r in data["results"] if r["kind"] == "specdiff"}


def table(runs: Sequence[Path]) -> str:
    """The markdown table of the runs' cells side by side, with the spread of each number."""
    per = [rows(p) for p in runs]
    keys = [k for k in per[0] if all(k in r for r in per)]
    head = "| cell | " + " | ".join(p.name for p in runs) + " | spread: mean / worst dB, FLOPs points |"
    lines = [head, "|" + "---|" * (len(runs) + 2)]

    def spread(vals: list[float]) -> float:
        return max(vals) - min(vals)

    for key in keys:
        got = [r[key] for r in per]
        cells = [f"{g['mean_psnr']:.2f} / {g['worst_psnr']:.2f}, {100 * g['flops']:.1f} %" for g in got]
        s = (spread([g["mean_psnr"] for g in got]), spread([g["worst_psnr"] for g in got]),
             100 * spread([g["flops"] for g in got]))
        lines.append(f"| {' '.join(map(str, key))} | " + " | ".join(cells) + f" | {s[0]:.2f} / {s[1]:.2f}, {s[2]:.1f} |")
    if keys:
        avg = [[sum(r[k][f] for k in keys) / len(keys) for r in per] for f in ("mean_psnr", "worst_psnr", "flops")]
        low = [min(r[k]["worst_psnr"] for k in keys) for r in per]
        cells = [f"{m:.2f} / {w:.2f} (lowest {lo:.2f}), {100 * f:.1f} %" for m, w, f, lo in zip(*avg, low)]
        lines.append(f"| mean of the {len(keys)} cells | " + " | ".join(cells)
                     + f" | {spread(avg[0]):.2f} / {spread(avg[1]):.2f}, {100 * spread(avg[2]):.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--offsets", default="0,1,2", help="comma-separated probe seed offsets (0: the library's draw)")
    p.add_argument("--out", default="probe_seed_spread", help="each run goes to OUT/offset_K")
    p.add_argument("--merge", default="", help="comma-separated run folders to tabulate (no run)")
    a = p.parse_args(own)
    sys.path.insert(0, str(ROOT))
    draws: dict[int, int] = {}
    if a.merge:
        runs = [Path(d) for d in a.merge.split(",") if d]
    else:
        from benchmarks import protocol

        if "--out" in rest or "--write" in rest:
            p.error("give --out before the '--': each run writes under OUT/offset_K")
        runs = []
        for off in (int(x) for x in a.offsets.split(",")):
            runs.append(Path(a.out) / f"offset_{off}")
            with probe_seed_offset(off) as seeds:
                protocol.main(rest + ["--write", "--out", str(runs[-1])])
            draws[off] = len(seeds)
            print(f"offset {off}: {len(seeds)} probe draws" + (" (none: the offset changed nothing)"
                                                                if not seeds else ""), flush=True)
    out = table(runs)
    print(out)
    return {"table": out, "draws": draws}


if __name__ == "__main__":
    main()
