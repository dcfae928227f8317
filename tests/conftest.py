"""Shared test helpers: Dynamo graph capture of tiny models and the oracle's builders."""

from __future__ import annotations

import os
import sys
import weakref

import pytest
import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(__file__))

from oracle import flux_inputs, full_reference, sd3_inputs, tiny_flux, tiny_sd3  # noqa: E402

# tests compile the same forward many times (models, shapes, backends); never let
# Dynamo silently fall back to eager because a recompile limit was reached
torch._dynamo.config.recompile_limit = 1024
torch._dynamo.config.accumulated_recompile_limit = 4096
# two threads per test process; one per process when pytest-xdist runs the files in parallel
# (scripts/test.sh: one process per core), so that the processes do not oversubscribe the cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def capture(model: torch.nn.Module, inputs: dict) -> tuple[torch.fx.GraphModule, list]:
    """Dynamo's FX graph of ``model(**inputs)`` (fullgraph, no grad) and its example inputs."""
    store: dict = {}

    def grab(gm, example_inputs):
        store["gm"], store["ex"] = gm, list(example_inputs)
        # Dynamo drops its placeholders' "grapharg" (which holds the concrete inputs) once
        # the backend returns: keep what analyses that read input values see inside the backend
        for node, ex in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
            if isinstance(ex, torch.Tensor):
                node.meta["specdiff_example"] = weakref.ref(ex)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True, dynamic=False)(**inputs)
    return store["gm"], store["ex"]


MODELS = {
    "sd3": (lambda: tiny_sd3(0), lambda b=2, s=0: sd3_inputs(b, 8, 12, seed=s)),
    "sd35": (lambda: tiny_sd3(0, sd35=True), lambda b=2, s=0: sd3_inputs(b, 8, 12, seed=s)),
    "flux": (lambda: tiny_flux(0), lambda b=2, s=0: flux_inputs(b, 4, 6, seed=s)),
}


class Captured:
    """A tiny model, its inputs, and the Dynamo graph of its forward."""

    def __init__(self, name: str, batch: int = 2) -> None:
        make_model, make_inputs = MODELS[name]
        self.name = name
        self.model = make_model()
        self.inputs = make_inputs(batch)
        self.gm, self.example_inputs = capture(self.model, self.inputs)

    def stale_inputs(self, seed: int = 1) -> dict:
        """Same shapes, other timestep/latent: K/V from these are stale for ``inputs``."""
        return MODELS[self.name][1](self.inputs["hidden_states"].shape[0], seed)

    def graph_inputs(self, inputs: dict) -> list:
        """Dynamo's flat input list for other ``inputs`` of the same shapes (the
        forward's keyword inputs swapped in, parameters kept)."""
        out = []
        for node, ex in zip(self.gm.graph.find_nodes(op="placeholder"), self.example_inputs):
            key = node.name[len("l_kwargs_"):-1] if node.name.startswith("l_kwargs_") else None
            out.append(inputs[key] if key in inputs else ex)
        return out


@pytest.fixture(scope="session")
def captured():
    cache: dict = {}

    def get(name: str, batch: int = 2) -> Captured:
        if (name, batch) not in cache:
            cache[(name, batch)] = Captured(name, batch)
        return cache[(name, batch)]

    return get


@pytest.fixture(scope="session")
def reference(captured):
    """The oracle's full reference of a captured model, at its inputs or (``stale=True``) at
    other inputs of the same shapes, whose K/V are then stale for the captured inputs."""
    cache: dict = {}

    def get(name: str, stale: bool = False):
        if (name, stale) not in cache:
            c = captured(name)
            with torch.no_grad():
                cache[(name, stale)] = full_reference(c.model, c.stale_inputs() if stale else c.inputs)
        return cache[(name, stale)]

    return get
