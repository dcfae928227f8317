"""Controllers: what a generation computes on each step.

A controller is a :class:`Policy` with one decision interface: before every main-run call
after the first, :meth:`Policy.decide` returns a :class:`Decision` — compute every token
(``full``), compute ``k`` image tokens with the rest from caches (``sparse(k)``, ``k`` one of
the token counts the policy declared, so each is a compiled variant), or compute no token
(``skip``). After the call :meth:`Policy.observe` sees what was measured on it.

Policies are registered by name (``register_policy``) and chosen by the config
(``SpecDiffConfig.controller``); :func:`make_policy` builds the configured one.
"""

from __future__ import annotations

from .base import (Action, Decision, Observation, Policy, StepView, make_policy, policies, policy_options,
                   register_policy)
from . import error, fixed  # noqa: F401  (register "error" and "fixed")

__all__ = ["Action", "Decision", "Observation", "Policy", "StepView", "make_policy", "policies", "policy_options",
           "register_policy"]
