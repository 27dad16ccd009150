"""The knapsack against brute force, the sensitivity measure, and the allocation as a recipe that
validates and runs on a tiny model."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch

from pocketlm import PocketError
from pocketlm.pipeline import Run
from pocketlm.planner import to_toml
from pocketlm.plugins import get_plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing import make_context
from pocketlm.testing.models import save_tiny_model, tiny_model, tiny_windows
from pocketlm.weights import QuantizedEmbedding, QuantizedLinear
from pocketlm_mixed.mixed import (MixedOptions, allocate, allocation_stages, compress_mixed, plan_allocation,
                                  storage_bits, weighted_error)


def _brute_force(costs, errors, budget):
    best, best_choice = float("inf"), None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[i] for c, i in zip(costs, choice))
        error = sum(e[i] for e, i in zip(errors, choice))
        if cost <= budget and error < best:
            best, best_choice = error, choice
    return best, best_choice


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_is_optimal_and_meets_the_budget_against_brute_force(seed):
    rng = random.Random(seed)
    items = rng.randint(3, 6)
    costs = [[rng.randint(1, 30) for _ in range(rng.randint(2, 4))] for _ in range(items)]
    errors = [[rng.random() * 10 for _ in c] for c in costs]
    budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    chosen = allocate(costs, errors, budget, resolution=budget)        # unit 1: exact
    cost = sum(c[i] for c, i in zip(costs, chosen))
    error = sum(e[i] for e, i in zip(errors, chosen))
    assert cost <= budget
    optimum, _ = _brute_force(costs, errors, budget)
    assert error == pytest.approx(optimum)


def test_coarse_knapsack_still_meets_the_budget():
    rng = random.Random(0)
    costs = [[rng.randint(100, 5000) for _ in range(6)] for _ in range(40)]
    errors = [[rng.random() for _ in c] for c in costs]
    budget = sum(sorted(c)[2] for c in costs)
    chosen = allocate(costs, errors, budget, resolution=50)
    assert sum(c[i] for c, i in zip(costs, chosen)) <= budget
    with pytest.raises(ValueError, match="no choice fits"):
        allocate(costs, errors, sum(min(c) for c in costs) - 1, resolution=50)


def test_storage_bits_follow_the_gguf_blocks():
    assert storage_bits(4, 1536, "gguf") == 4.5 and storage_bits(3, 1536, "gguf") == 3.4375
    assert storage_bits(3, 576, "gguf") == 4.5 and storage_bits(6, 576, "gguf") == 8.5
    assert storage_bits(2, 256, "gguf") == 2.625 and storage_bits(8, 256, "gguf") == 8.5
    assert storage_bits(4, 576, "grid") == 4.5


def test_weighted_error_counts_loud_channels_more():
    W = torch.zeros(2, 2)
    Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert weighted_error(W, Q, torch.tensor([10.0, 1.0])) == 11.0


def _context():
    return make_context(tiny_windows(4, 32), plugins=get_plugins())


@pytest.mark.parametrize("size_model,budget", [("gguf", 5.0), ("grid", 4.0)])
def test_allocation_meets_the_budget_and_uses_several_widths(size_model, budget):
    model = tiny_model("llama", intermediate=256, outliers=True)
    options = MixedOptions(bits_per_weight=budget, size_model=size_model, embedding_bits=[4, 8])
    items, chosen, embedding = plan_allocation(model, options, _context())
    params = sum(i.params for i in items)
    total = sum(i.costs[c] for i, c in zip(items, chosen))
    assert total <= params * budget / 8
    widths = {i.choices[c] for i, c in zip(items, chosen)}
    assert len(widths) >= 2
    # a wider choice of the same matrix never has a larger error (the measure is monotone in bits)
    for item in items:
        for (b1, e1), (b2, e2) in itertools.pairwise(sorted(zip(item.choices, item.errors))):
            assert e2 <= e1 * 1.05 + 1e-9, (item.name, b1, b2)


def test_an_impossible_budget_is_a_clear_error():
    with pytest.raises(PocketError) as error:
        plan_allocation(tiny_model("llama"), MixedOptions(bits_per_weight=1.5, bits=[4, 8]), _context())
    assert error.value.field == "bits_per_weight" and "below the smallest allocation" in str(error.value)


def test_the_stage_quantizes_every_linear_to_its_allocated_width():
    model = tiny_model("llama", intermediate=256, outliers=True)
    options = MixedOptions(bits_per_weight=5.0, quantizer="rtn", embedding_bits=[8])
    compress_mixed(model, options, _context())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n != "lm_head"}
    assert len(linears) == 14
    assert len({m.bits for m in linears.values()}) >= 2


RECIPE = """[model]
source = "{model}"
[calibration]
samples = 4
seq_len = 32
{stages}
[evaluate]
metrics = ["perplexity", "size"]
[evaluate.perplexity]
windows = 2
seq_len = 32
[export]
format = "gguf"
tokenizer = false
"""


def test_the_allocation_is_a_recipe_of_existing_methods_that_validates_and_runs(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "llama", intermediate=256)
    model = tiny_model("llama", intermediate=256)
    plugins = get_plugins()
    items, chosen, embedding = plan_allocation(model, MixedOptions(bits_per_weight=5.0, embedding_bits=[8]), _context())
    stages = allocation_stages(items, chosen, MixedOptions(bits_per_weight=5.0, embedding_bits=[8]), embedding)
    assert len(stages) >= 2 and all(s["method"] in ("gptq", "rtn") for s in stages)
    text = to_toml({"stages": stages})
    recipe = parse_recipe(RECIPE.format(model=folder, stages=text), plugins, file="mixed.toml")
    report = Run(recipe, tmp_path / "run", plugins, echo=lambda m: None).execute()
    assert report["stages"] and len(report["stages"]) == len(stages)
    # two stages naming the same linear are still refused
    clash = stages[:1] + [dict(stages[0], bits=8, group_size=32, grid="minmax")]
    with pytest.raises(PocketError, match="two quantize stages would act on the same layers"):
        parse_recipe(RECIPE.format(model=folder, stages=to_toml({"stages": clash})), plugins, file="mixed.toml")


def test_the_mixed_method_runs_from_a_recipe_and_saves_its_allocation(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "llama", intermediate=256)
    plugins = get_plugins()
    stage = '[[stages]]\nmethod = "mixed"\nbits_per_weight = 5.0\nquantizer = "rtn"\n'
    recipe = parse_recipe(RECIPE.format(model=folder, stages=stage), plugins, file="mixed.toml")
    lines = []
    Run(recipe, tmp_path / "run", plugins, echo=lines.append).execute()
    saved = list((tmp_path / "run").rglob("mixed-recipe.toml"))
    assert saved
    again = parse_recipe(saved[0].read_text(), plugins, file="again.toml")
    assert len(again.stages) >= 2 and {s.method for s in again.stages} == {"rtn"}
    report = Run(again, tmp_path / "again", plugins, echo=lambda m: None).execute()
    assert len(report["stages"]) == len(again.stages)
    assert any("mixed:" in line and "bits per weight" in line for line in lines)
