"""Acceptance: the conformance kit accepts every option set the first-party plugins' ``plan``
proposes (to the planner, under any budget), and every recipe the planner composes from them
validates. A proposal the kit refused would be a candidate ``pocketlm plan`` offers that a
plugin's own contract rejects."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketlm.planner import PlanBudget, candidates, to_toml
from pocketlm.plugins import get_plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing import conformance as kit

ROOT = Path(__file__).resolve().parents[1]
#: The distributions under plugins/ (the first-party plugins).
FIRST_PARTY = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())
BUDGETS = (PlanBudget(), PlanBudget(target_bits=3.0), PlanBudget(target_size_mb=40.0), PlanBudget(min_retention=0.95))
#: Deep enough for every proposed depth cut (prune-depth proposes removing up to 6 layers).
LAYERS = 8


def _first_party_planners():
    plugins = get_plugins()
    found = []
    for method in sorted(plugins.methods.values(), key=lambda m: m.name):
        owner = plugins.info(plugins.owner[("methods", method.name)])
        if method.plan is not None and owner.distribution in FIRST_PARTY:
            found.append(method.name)
    return found


def _proposals(name: str) -> list[dict]:
    method = get_plugins().methods[name]
    seen = []
    for budget in BUDGETS:
        for proposal in method.plan(budget):
            options = {k: v for k, v in proposal.items() if k != "default"}
            if options not in seen:
                seen.append(options)
    return seen


PLANNERS = _first_party_planners()


def test_the_first_party_plugins_propose_plans():
    # every distribution that registers a method with plan() is here; a lost plan() is noticed
    assert {"rtn", "gptq", "magnitude", "wanda", "sparsegpt", "prune-width", "prune-depth"} <= set(PLANNERS), PLANNERS


@pytest.mark.parametrize("name", PLANNERS)
def test_the_kit_accepts_every_proposal(name):
    """Each proposal passes the kit's options contract (validates, closed, frozen, JSON round
    trip, effect), then runs on a tiny llama deep enough for it: inputs untouched, the model
    changed and finite, the core checkpoint and (where it represents the result) the hf export."""
    proposals = _proposals(name)
    assert proposals
    defaults_build = True
    try:
        get_plugins().methods[name].options()
    except Exception:  # noqa: BLE001 - a method whose user must choose (prune-width): not this test's point
        defaults_build = False
    method = get_plugins().methods[name]
    for options in proposals:
        kit.check_options(name, options, defaults_build=defaults_build)
        if method.needs_before:  # it works on what another stage made, beside a float teacher:
            continue             # its plugin's own tests run it (the kit's runs start from a float model)
        run = kit.check_runs(name, options, "llama", model=kit.tiny("llama", layers=LAYERS))
        kit.check_loadable(run.model, ids=run.windows, what=f"{name} with {options}", hf=kit.hf_represents(run))


def test_every_recipe_the_planner_composes_validates():
    plugins = get_plugins()
    composed = candidates(plugins)
    assert len(composed) > 10
    for candidate in composed:
        text = to_toml(candidate.recipe("tiny:llama", "auto"))
        parse_recipe(text, plugins, file=f"{candidate.label}.toml")
