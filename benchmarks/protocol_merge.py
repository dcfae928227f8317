"""Several evaluation-protocol runs as one: their results side by side, each model's curve as a
table (every method's mean over the model's cells), and the plots.

    python benchmarks/protocol_merge.py RUN1/protocol.json RUN2/protocol.json ... [--write --out DIR]

A curve of many settings is measured as several runs of ``benchmarks/protocol.py`` (one per core:
specdiff settings in one, caches in another, one model per run); this puts them together. Runs must
share the prompts and the seeds (else their images differ and the cells are not comparable: an
error). A (model, sampler, steps, method) measured by several runs is kept once if the runs agree
on every image's PSNR (the references are deterministic, so they do; ``eager`` is in every run), and
is an error if they do not.

It prints, per model, one row per method: the number of cells, the mean of the cells' mean PSNR,
the lowest worst image, the mean FLOPs over the cells (sorted by FLOPs: the curve), and over every
cell of the runs the same with the lowest cell, the cells whose every image is at least the target
and the range of FLOPs; then, per cache setting, the specdiff setting at no more FLOPs that lies
above it on the mean and the one above it on the mean and the worst image, if any
(``benchmarks.protocol.dominance_rows``: the target that specdiff's curve lies above every
cache's). ``--write`` writes ``protocol.json``, ``protocol.md`` (the protocol's
tables and these) and ``<model>.png`` (``benchmarks.protocol.plot_model``) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import protocol  # noqa: E402

_KEY = ("model", "sampler", "steps", "method")


def merge(runs: Sequence[dict], sources: Sequence[str] = ()) -> dict:
    """One protocol result out of ``runs`` (the dicts ``protocol.json`` holds)."""
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]
    for i, run in enumerate(runs[1:], 1):
        for field in ("prompts", "seeds"):
            if run[field] != first[field]:
                raise ValueError(f"run {i} has other {field} than run 0 ({run[field]!r} against {first[field]!r}): "
                                 "its cells are not comparable")
    results: dict[tuple, dict] = {}
    for i, run in enumerate(runs):
        for r in run["results"]:
            key = tuple(r[k] for k in _KEY)
            if key in results:
                if results[key].get("psnr") != r.get("psnr"):
                    raise ValueError(f"run {i} measured {key} otherwise than an earlier run")
                continue
            results[key] = r
    models: dict[str, dict] = {}
    for run in runs:
        for md in run["models"]:
            have = models.setdefault(md["name"], dict(md, samplers=[]))
            have["samplers"] += [s for s in md["samplers"] if s not in have["samplers"]]
    methods: dict[str, dict] = {}
    for run in runs:
        for m in run["methods"]:
            methods.setdefault(m["label"], m)
    merged = dict(first)
    rs = list(results.values())
    merged.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/protocol_merge.py", *sources]) if sources else "protocol_merge.merge",
        "runs": [{"command": r["command"], "date": r["date"], "git": r["git"]} for r in runs],
        "models": list(models.values()), "methods": list(methods.values()), "results": rs,
        "speed": [s for run in runs for s in run.get("speed", [])],
        "summary": {"heldout": protocol.summary_rows(rs, "heldout"), "tune": protocol.summary_rows(rs, "tune")},
        "wall_seconds": sum(r["wall_seconds"] for r in runs),
    })
    commits = {r["git"]["commit"] for r in runs}
    if len(commits) > 1:
        merged["git"] = dict(first["git"], commit=" + ".join(sorted(c[:12] for c in commits)))
    return merged


#: each model's curve and the caches against specdiff's settings (``protocol.py --write`` writes them too)
curve_markdown = protocol.curve_markdown


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="protocol.json files of benchmarks/protocol.py --write runs")
    p.add_argument("--write", action="store_true", help="write protocol.json, protocol.md and <model>.png into --out")
    p.add_argument("--out", type=Path, default=protocol.ROOT / "benchmarks" / "protocol_merged")
    a = p.parse_args(argv)
    data = merge([json.loads(path.read_text()) for path in a.runs], [str(path) for path in a.runs])
    curves = curve_markdown(data)
    print(curves, flush=True)
    if a.write:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "protocol.json").write_text(json.dumps(protocol._plain(data), indent=1, allow_nan=False))
        (a.out / "protocol.md").write_text(protocol.markdown(data) + curves)
        for md in data["models"]:
            protocol.plot_model(data, md["name"], a.out / f"{md['name']}.png")
    return data


if __name__ == "__main__":
    main()
