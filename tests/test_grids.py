"""Grid rules: the register_grid_rules hook, the core's minmax and weighted-mse rules, and the
recipe check of a method's ``grid`` option."""

from __future__ import annotations

import types

import pytest
import torch

from pocketlm import GridRule, Method, Options, PocketError, hookimpl
from pocketlm.grids import minmax_group_grid, weighted_error, weighted_group_grid
from pocketlm.plugins import Plugins
from pocketlm.recipe import parse_recipe
from pocketlm.testing.conformance import ConformanceError, GridRuleConformance, check_grid_rule
from pocketlm.weights import minmax_grid, quantize


def _weighted_error(W, scales, zeros, bits, group_size, importance):
    scale = scales.repeat_interleave(group_size, 1)
    zero = zeros.repeat_interleave(group_size, 1)
    return float((((quantize(W, scale, zero, bits) - zero) * scale - W) ** 2 * importance).sum())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [-1, 16, 32])
def test_minmax_rule_is_minmax_grid_per_group(symmetric, group_size):
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    scales, zeros = minmax_group_grid(W, 4, group_size, symmetric)
    size = 64 if group_size == -1 else group_size
    for g in range(64 // size):
        scale, zero = minmax_grid(W[:, g * size:(g + 1) * size], 4, symmetric)
        assert torch.equal(scales[:, g:g + 1], scale) and torch.equal(zeros[:, g:g + 1], zero)


@pytest.mark.parametrize("bits,symmetric", [(3, True), (4, True), (4, False)])
def test_weighted_mse_beats_minmax_on_skewed_importance(bits, symmetric):
    generator = torch.Generator().manual_seed(1)
    W = torch.randn(64, 64, generator=generator)
    importance = torch.rand(64, generator=generator) ** 6 * 100    # a few loud input channels
    minmax = _weighted_error(W, *minmax_group_grid(W, bits, 32, symmetric), bits, 32, importance)
    weighted = _weighted_error(W, *weighted_group_grid(W, bits, 32, symmetric, importance), bits, 32, importance)
    assert weighted < 0.9 * minmax
    # scales are float16 values and zero points integers, like every stored grid
    scales, zeros = weighted_group_grid(W, bits, 32, symmetric, importance)
    assert torch.equal(scales.half().float(), scales) and torch.equal(zeros.round(), zeros)


def test_weighted_error_is_per_row():
    w = torch.tensor([[1.0, -1.0], [0.3, 0.1]])
    scale, zero = torch.tensor([[1.0], [1.0]]), torch.tensor([[8.0], [8.0]])
    error = weighted_error(w, scale, zero, 4, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(error, torch.tensor([0.0, 0.3**2 + 2 * 0.1**2]))


class _GridOptions(Options):
    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    grid: str = "minmax"


def _grid_plugin():
    module = types.ModuleType("grid-toy")
    module.POCKETLM_API = ">=1.3,<2"

    @hookimpl
    def register_grid_rules(register):
        register(GridRule(name="toy-pow2", fit=lambda W, bits, group_size, symmetric, importance=None:
                          minmax_group_grid(W, bits, group_size, symmetric), bits=(4,), group_sizes=(32,),
                          symmetric=True, summary="test-only"))

    @hookimpl
    def register_methods(register):
        register(Method("toy-grid", "quantize", _GridOptions, lambda model, options, context: model))

    module.register_grid_rules = register_grid_rules
    module.register_methods = register_methods
    return module


def test_register_grid_rules_adds_rules_next_to_the_core_ones():
    plugins = Plugins(entry_points=False, extra=[("grid-toy", _grid_plugin())])
    assert {"minmax", "weighted-mse", "toy-pow2"} <= set(plugins.grid_rules)
    assert plugins.owner[("grid_rules", "toy-pow2")] == "grid-toy"
    assert plugins.info("grid-toy").provides["grid_rules"] == ["toy-pow2"]


def test_a_grid_rule_without_a_callable_fit_skips_its_plugin():
    module = types.ModuleType("bad-grid")
    module.POCKETLM_API = ">=1.3,<2"
    module.register_grid_rules = hookimpl(lambda register: register(GridRule(name="bad", fit=None)))
    plugins = Plugins(entry_points=False, extra=[("bad-grid", module)])
    assert "bad" not in plugins.grid_rules
    assert any("fit is not callable" in p.reason for p in plugins.problems)


RECIPE = """[model]
source = "tiny:llama"
[[stages]]
method = "toy-grid"
{options}
[export]
format = "hf"
"""


def test_recipe_refuses_an_unknown_grid_rule_listing_the_installed_ones():
    plugins = Plugins(entry_points=False, extra=[("grid-toy", _grid_plugin())])
    with pytest.raises(PocketError) as error:
        parse_recipe(RECIPE.format(options='grid = "minmux"'), plugins, file="recipe.toml")
    message = str(error.value)
    assert "unknown grid rule 'minmux'" in message and "stages[0].grid" in message and "recipe.toml:5" in message
    assert "did you mean 'minmax'?" in message and "installed grid rules: minmax, toy-pow2, weighted-mse" in message


def test_recipe_refuses_a_grid_rule_the_stage_settings_do_not_fit():
    plugins = Plugins(entry_points=False, extra=[("grid-toy", _grid_plugin())])
    with pytest.raises(PocketError) as error:
        parse_recipe(RECIPE.format(options='grid = "toy-pow2"\nbits = 3\ngroup_size = 64'), plugins, file="recipe.toml")
    message = str(error.value)
    assert "grid rule 'toy-pow2' needs bits = 4 (not 3), group_size = 32 (not 64)" in message
    assert "set bits = 4 and group_size = 32" in message
    parse_recipe(RECIPE.format(options='grid = "toy-pow2"'), plugins, file="recipe.toml")   # fits: accepted


# ------------------------------------------------------------ the grid-rule conformance kit


class TestMinmaxGridRuleConformance(GridRuleConformance):
    grid_rule = "minmax"              # every setting: bits 2-8, every group size, both symmetries


class TestWeightedMSEGridRuleConformance(GridRuleConformance):
    grid_rule = "weighted-mse"        # every setting


def _rule_plugins(fit, **declared):
    module = types.ModuleType("grid-broken")
    module.POCKETLM_API = ">=1.3,<2"
    module.register_grid_rules = hookimpl(lambda register: register(GridRule(name="broken", fit=fit, **declared)))
    return Plugins(entry_points=False, extra=[("grid-broken", module)])


def _fails(fit, match, settings=((4, 32, False),), **declared):
    with pytest.raises(ConformanceError, match=match):
        check_grid_rule("broken", settings, plugins=_rule_plugins(fit, **declared))


def test_the_grid_kit_catches_broken_rules():
    def scaled(factor):
        return lambda W, bits, g, sym, imp=None: (minmax_group_grid(W, bits, g, sym)[0] * factor,
                                                 minmax_group_grid(W, bits, g, sym)[1])

    _fails(scaled(1.0001), "not float16 values")
    _fails(scaled(8.0), r"times min-max's")                           # a scale off by a factor
    _fails(lambda W, bits, g, sym, imp=None: minmax_group_grid(W, bits, 64, sym), r"expected \[rows, groups\]")
    _fails(lambda W, bits, g, sym, imp=None: (W.abs().amax(1, keepdim=True).expand(-1, 2).contiguous(),
                                              torch.zeros(W.shape[0], 2)), "zero, negative or not finite")
    _fails(lambda W, bits, g, sym, imp=None: (minmax_group_grid(W, bits, g, False)[0],
                                              minmax_group_grid(W, bits, g, False)[1] + 0.5), "not integers")
    _fails(lambda W, bits, g, sym, imp=None: minmax_group_grid(W, bits, g, False), "symmetric grid's zero point",
           settings=((4, 32, True),))
    _fails(lambda W, bits, g, sym, imp=None: weighted_group_grid(W, bits, g, sym, imp),
           "does not declare uses_importance")

    def careless(W, bits, g, sym, imp=None):
        W.mul_(1.0)[0, 0] = 1.0                                       # writes into the weight
        return minmax_group_grid(W, bits, g, sym)

    _fails(careless, "modified the weight")

    def noisy(W, bits, g, sym, imp=None):
        scales, zeros = minmax_group_grid(W, bits, g, sym)
        return scales * (1 + torch.randint(0, 2, scales.shape) * 2.0 ** -9), zeros   # float16 steps, random

    _fails(noisy, "not deterministic")

    def device_less(W, bits, g, sym, imp=None):
        scales, zeros = minmax_group_grid(W, bits, g, sym)
        return scales * torch.ones(scales.shape), zeros               # torch.ones without device=

    _fails(device_less, "makes a tensor without device=")


def test_the_grid_kit_checks_the_settings_a_rule_declares():
    plugins = _rule_plugins(minmax_group_grid, bits=(4,), group_sizes=(32,), symmetric=True)
    assert check_grid_rule("broken", plugins=plugins) == {"bits=4, group_size=32, symmetric=True": "ok"}
    with pytest.raises(ConformanceError, match="cannot fit these settings: it needs group_size = 32"):
        check_grid_rule("broken", ((4, 64, True),), plugins=plugins)
