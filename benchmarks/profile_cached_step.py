"""Where a cached step's time goes, against a full step: ``torch.profiler`` on the mid config.

``python benchmarks/profile_cached_step.py [--cache-ratio 0.9] [--context-ratio 0.5]`` builds the
full variant and the sparse variant (``k = (1 - cache_ratio) * N``, K/V extrapolated, of the
``M`` context tokens ``M - round(context_ratio * M)`` computed: a text subset, every text token
with ``--context-ratio 0``; the default, 0.5, is what a default cached step runs) of the mid
config (SD3 architecture, random weights: 8 layers, hidden 512, 1024 image tokens, 80 context
tokens, batch 2) with Inductor, times each
(mean of 5 calls after 2 warm-up calls) and profiles 3 calls of each (``--ab``: times the
cached step against the same step compiled so that Inductor copies every cache it writes, and
against the same step without the ``few_row_linear`` pass, and against the same step with its K/V
caches in the other dtype (``kv_dtype="model"``, float32, where the defaults store bfloat16),
each right after a full step as in a generation, instead; ``--weights``: times the blocks' linear layers alone, at a cached and a
full step's rows, reading each layer's own weights against one resident weight per shape, and
prepacked for oneDNN where it is built in; ``--freezing``: times the untouched mid config under
Inductor with and without ``freezing=True``). It prints the self-CPU
time by category (matmuls, attention, Inductor's generated kernels, the rest), the largest
entries, and the cached step's time as a multiple of its FLOP share of a full step (the
target is at most 1.3). Inductor's kernel profiling (``cpp.enable_kernel_profile``) names each
generated kernel; identical kernels of several layers share one name and add up.
"""

from __future__ import annotations

import argparse
import collections
import functools
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "mkl", "onednn")):
        return "matmul"
    if "attention" in n or "flash" in n:
        return "attention"
    if "cpp_fused" in n or "kernel" in n:
        return "inductor kernels"
    return "other"


def profile(fn, calls: int = 3) -> tuple[collections.Counter, collections.Counter]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    by, top = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        if e.key.startswith(("ProfilerStep", "## Call CompiledFxGraph")):
            continue
        by[category(e.key)] += e.self_cpu_time_total
        top[e.key] += e.self_cpu_time_total
    return by, top


def alternate(fns: dict, rounds: int) -> dict:
    """Seconds per call of each of ``fns`` (name -> callable), called in turn ``rounds`` times
    so that the VM's drift hits them alike; the median (upper, for an even count) per name.
    Each round calls them in a new random order (seeded): variants of one model read the same
    weights, a call right after another finds the end of them still in the CPU's last-level
    cache, and a call right after a full step finds nothing; a fixed order (or a rotation of
    it, which keeps who follows whom) gives those to the same variant every round."""
    times = {name: [] for name in fns}
    order, rng = list(fns.items()), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def after_full(full: Callable[[], Any], cached: dict, rounds: int) -> dict:
    """Seconds per call of each of ``cached`` (name -> callable), each called right after a call
    of ``full``, as a generation's sparse call follows a full call (which leaves none of the
    weights or caches a cached step reads in the CPU's caches); the pairs in a new random order
    (seeded) each round; medians (upper), and the full call's under ``"full"``."""
    times: dict[str, list[float]] = {"full": [], **{name: [] for name in cached}}
    names, rng = list(cached), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            for key, fn in (("full", full), (name, cached[name])):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def weight_streaming(image_share: float, text_share: float, rounds: int = 7) -> dict:
    """The mid config's attention and MLP linears (image stream at ``B * k`` rows, context stream
    at ``B * k_txt``, against ``B * N`` and ``B * M`` on a full step), run one after another as
    a step runs them: each with its own weight, and again with one weight per shape (resident in
    the CPU's caches). The gap between the two is what reading every weight once per call costs,
    which computing fewer tokens does not remove; medians of ``rounds``. Where oneDNN is built in,
    also each with its own weight prepacked for oneDNN (``mkldnn._linear_pointwise``; what the
    GEMM library alone is worth on this host, the same for every backend; ``None`` otherwise)."""
    import torch.nn.functional as F

    from benchmarks.configs import MID_CONTEXT_TOKENS, MID_LATENT, MID_SD3, mid_inputs, mid_sd3

    model = mid_sd3()
    lins = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and any(part in name for part in (".attn.", ".ff.", ".ff_context."))]
    text = {name for name, _ in lins if ".add_" in name or "to_add_out" in name or ".ff_context." in name}
    resident = {}
    for _, m in lins:
        resident.setdefault(tuple(m.weight.shape), m.weight)
    packed = _onednn_packed(lins)
    b = mid_inputs()["hidden_states"].shape[0]
    n, m_txt = (MID_LATENT[1] // MID_SD3["patch_size"]) * (MID_LATENT[2] // MID_SD3["patch_size"]), MID_CONTEXT_TOKENS
    settings = {"cached": (max(1, round(image_share * n)) * b, max(1, round(text_share * m_txt)) * b),
                "full": (n * b, m_txt * b)}
    out = {}
    with torch.no_grad():
        for label, (rows_img, rows_txt) in settings.items():
            xs = {(name in text, m.in_features): torch.randn(rows_txt if name in text else rows_img, m.in_features)
                  for name, m in lins}
            flops = sum(2 * xs[(name in text, m.in_features)].shape[0] * m.in_features * m.out_features
                        for name, m in lins)

            def run(how: str) -> None:
                for name, m in lins:
                    x = xs[(name in text, m.in_features)]
                    if how == "onednn":
                        torch.ops.mkldnn._linear_pointwise(x, packed[name], m.bias, "none", [], "")
                    else:
                        F.linear(x, resident[tuple(m.weight.shape)] if how == "resident" else m.weight, m.bias)

            hows = ("own", "resident") + (("onednn",) if packed else ())
            med = alternate({how: functools.partial(run, how) for how in hows}, rounds)
            out[label] = {"rows": (rows_img, rows_txt), "own_weights_s": med["own"], "resident_s": med["resident"],
                          "onednn_packed_s": med.get("onednn"), "flops": flops}
            line = (f"{label} ({rows_img} image rows, {rows_txt} context rows): own weights {med['own'] * 1e3:.1f} ms "
                    f"({flops / med['own'] / 1e9:.0f} GFLOP/s), one resident weight per shape "
                    f"{med['resident'] * 1e3:.1f} ms ({flops / med['resident'] / 1e9:.0f} GFLOP/s)")
            if packed:
                line += (f", own weights prepacked for oneDNN {med['onednn'] * 1e3:.1f} ms "
                         f"({flops / med['onednn'] / 1e9:.0f} GFLOP/s)")
            print(line)
    mb = sum(m.weight.numel() * m.weight.element_size() for _, m in lins) / 2 ** 20
    print(f"{len(lins)} linears, {mb:.0f} MiB of weights read per call")
    return out


def _onednn_packed(lins: list) -> dict:
    """Each linear's weight prepacked for oneDNN, checked against ``F.linear`` on one layer;
    empty where this build has no oneDNN linear."""
    import torch.nn.functional as F

    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return {}
    with torch.no_grad():
        packed = {name: ops._reorder_linear_weight(m.weight, None) for name, m in lins}
        name, m = lins[0]
        x = torch.randn(8, m.in_features)
        got = ops._linear_pointwise(x, packed[name], m.bias, "none", [], "")
        torch.testing.assert_close(got, F.linear(x, m.weight, m.bias), rtol=1e-4, atol=1e-4)
    return packed


def inductor_freezing(rounds: int = 5) -> dict:
    """The untouched mid config compiled by Inductor as is and with ``freezing=True`` (weights
    folded in as constants, prepacked where Inductor's CPU passes do so), called alternately
    under ``no_grad``; medians of ``rounds`` calls each, the largest output difference from
    eager, and whether the frozen one did fold its weights (a weight changed in place after
    compiling does not reach its output)."""
    import copy

    import torch._inductor.config as inductor_config

    from benchmarks.configs import mid_inputs, mid_sd3

    model, inputs = mid_sd3(), mid_inputs()
    plain_model, frozen_model = copy.deepcopy(model), copy.deepcopy(model)

    # two functions, two code objects: Dynamo keeps a separate cache for each (one compiled
    # module.forward would serve both models from its first entry)
    def plain_call():
        return plain_model(**inputs)[0]

    def frozen_call():
        return frozen_model(**inputs)[0]

    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(**inputs)[0]
        fns = {"plain": torch.compile(plain_call)}
        fns["plain"]()
        with inductor_config.patch(freezing=True):  # Dynamo and Inductor read it while compiling
            fns["frozen"] = torch.compile(frozen_call)
            fns["frozen"]()
        diff = {name: float((fn() - ref).abs().max()) for name, fn in fns.items()}
        med = alternate(fns, rounds)
        weight = next(p for p in frozen_model.parameters() if p.dim() == 2)
        before = fns["frozen"]()
        weight.add_(1.0)
        folded = bool(torch.equal(fns["frozen"](), before))
        weight.sub_(1.0)
    print(f"Inductor {med['plain'] * 1e3:.1f} ms per call, with freezing=True {med['frozen'] * 1e3:.1f} ms "
          f"(max |out - eager|: {diff['plain']:.2e} / {diff['frozen']:.2e}; weights folded: {folded})")
    return {"seconds": med, "max_abs_diff": diff, "folded": folded}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-ratio", type=float, default=0.9)
    p.add_argument("--context-ratio", type=float, default=0.5)
    p.add_argument("--top", type=int, default=8, help="largest entries printed per variant")
    p.add_argument("--ab", action="store_true",
                   help="instead of profiling: time the cached step, the cached step compiled without "
                        "variants.IN_PLACE_CACHES (Inductor then copies each cache it writes), the cached step "
                        "without the few_row_linear pass (every linear as Inductor lowers it) and the cached step "
                        "with its K/V caches in the other kv_dtype, each right after a full step, --rounds rounds, medians")
    p.add_argument("--rounds", type=int, default=8, help="--ab: rounds (each cached variant once after a full step per round)")
    p.add_argument("--weights", action="store_true",
                   help="instead of profiling: time the blocks' linear layers alone at a cached and a full "
                        "step's rows, each layer with its own weights (as a step streams them from memory) "
                        "and with one resident weight per shape")
    p.add_argument("--freezing", action="store_true",
                   help="instead of profiling: time the untouched mid config under Inductor with and without "
                        "freezing=True, alternately")
    a = p.parse_args(argv)
    if a.freezing:
        return inductor_freezing()
    if a.weights:
        return weight_streaming(1 - a.cache_ratio, 1 - a.context_ratio)

    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True
    from benchmarks.configs import mid_inputs, mid_sd3
    from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
    from specdiff_fx.runtime.context import text_mode, text_tokens
    from specdiff_fx.signature import Role, VariantKey

    model, inputs = mid_sd3(), mid_inputs()
    store = {}

    def grab(gm, example_inputs):
        store["gm"], store["inputs"] = gm, list(example_inputs)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=grab, dynamic=False)(**inputs)
    gm, example = store["gm"], store["inputs"]
    plan = analyze_dit(gm)
    cfg = SpecDiffConfig(cache_ratio=a.cache_ratio, context_ratio=a.context_ratio)
    k = cfg.num_computed(plan.num_image_tokens)
    context, k_txt = text_mode(a.context_ratio, plan, guided=True)
    full = build_variant(gm, example, plan, cfg, VariantKey.full())
    sparse = build_variant(gm, example, plan, cfg, VariantKey.sparse(k, context, k_txt=k_txt))
    g = torch.Generator().manual_seed(0)

    def positions(n: int, count: int) -> torch.Tensor:  # [B, count] distinct sorted positions
        return torch.stack([torch.randperm(n, generator=g)[:count].sort().values for _ in range(plan.batch)])

    extra = [positions(plan.num_image_tokens, k) if i.port.role is Role.IDX else
             positions(plan.num_text_tokens, k_txt) if i.port.role is Role.TEXT_IDX else
             torch.zeros(i.shape, dtype=i.dtype) for i in sparse.new_inputs]
    calls = {"full": lambda: full(*example), "cached": lambda: sparse(*example, *extra)}
    if a.ab:
        from specdiff_fx import variants

        saved = dict(variants.IN_PLACE_CACHES)
        variants.IN_PLACE_CACHES.clear()
        try:
            copying = build_variant(gm, example, plan, cfg, VariantKey.sparse(k, context, k_txt=k_txt))
        finally:
            variants.IN_PLACE_CACHES.update(saved)
        calls["cached, caches copied"] = lambda: copying(*example, *extra)
        from specdiff_fx.passes import few_row_linear, passes_for

        key = VariantKey.sparse(k, context, k_txt=k_txt)
        plain_linears = build_variant(gm, example, plan, cfg, key,
                                      passes=[q for q in passes_for(key, cfg) if q is not few_row_linear])
        extra2 = [e.clone() for e in extra]  # its own caches
        calls["cached, linears as x W^T"] = lambda: plain_linears(*example, *extra2)
        # the other K/V cache dtype: the model's (float32) where the defaults store bfloat16, else bfloat16
        other = "model" if cfg.kv_cache_dtype(torch.float32) != torch.float32 else "bfloat16"
        narrow = build_variant(gm, example, plan, cfg.replace(kv_dtype=other), key)
        extra3 = [e.clone() if i.port.role in (Role.IDX, Role.TEXT_IDX) else torch.zeros(i.shape, dtype=i.dtype)
                  for e, i in zip(extra, narrow.new_inputs)]
        calls[f"cached, kv_dtype={other!r}"] = lambda: narrow(*example, *extra3)
        with torch.no_grad():
            for fn in calls.values():
                fn(), fn()
            med = after_full(calls.pop("full"), calls, a.rounds)
        share = sparse.flops / full.flops
        for name, t in med.items():
            print(f"{name}: {t * 1e3:.1f} ms" + ("" if name == "full" else
                  f"; / full {t / med['full']:.3f}; time / FLOP share {t / med['full'] / share:.2f}"))
        return {"seconds": med, "flop_share": share}
    seconds = {}
    with torch.no_grad():
        for name, fn in calls.items():
            for _ in range(2):
                fn()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            seconds[name] = (time.perf_counter() - t0) / 5
            by, top = profile(fn)
            total = sum(by.values())
            shares = ", ".join(f"{c} {v / total:.1%}" for c, v in by.most_common())
            print(f"== {name}: {seconds[name] * 1e3:.1f} ms per call; self-CPU time: {shares}")
            for key, v in top.most_common(a.top):
                print(f"   {v / total:6.1%}  {key[:110]}")
    share = sparse.flops / full.flops
    ratio = seconds["cached"] / seconds["full"]
    text = "{} of {}".format(*text_tokens(context, k_txt, plan))
    print(f"k = {k} of {plan.num_image_tokens} image tokens, {text} text tokens; cached / full time {ratio:.3f}; FLOP share "
          f"{share:.3f}; time / FLOP share {ratio / share:.2f} (target <= 1.3)")
    return {"seconds": seconds, "flop_share": share, "time_over_share": ratio / share}


if __name__ == "__main__":
    main()
