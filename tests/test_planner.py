"""The hybrid planner composes only from what plugins declare."""

import types

import pytest

import pocketlm
from pocketlm import Exporter, Method, NoOptions, Options, SizeEffect, hookimpl
from pocketlm.planner import (DEMO_STATS, PlanBudget, candidates, choose_exporter, default_recipe_text, estimate,
                              to_toml)
from pocketlm.plugins import Plugins
from pocketlm.recipe import combination_problems, parse_recipe

from .conftest import make_toy_plugin


class WidthOptions(Options):
    ratio: float = 0.25


def make_structure_plugin():
    module = types.ModuleType("toy-structure")
    module.POCKETLM_API = ">=1.0"

    @hookimpl
    def register_methods(register):
        register(Method("toy-width", "prune", WidthOptions, lambda m, o, c: m, "test-only structural effect",
                        effect=lambda o: SizeEffect(params_removed=o.ratio, features=frozenset({"restructured"})),
                        phase=pocketlm.PHASE_RESTRUCTURE, not_after=frozenset({"quantize"}),
                        plan=lambda budget: [{"ratio": 0.25}]))

    @hookimpl
    def register_exporters(register):
        register(Exporter("dense-only", NoOptions, lambda m, p, o, c: None, represents=frozenset({"dense"})))
        register(Exporter("packed", NoOptions, lambda m, p, o, c: None,
                          represents=frozenset({"dense", "quantized", "masked", "restructured"}),
                          packs=frozenset({"quantized"})))

    module.register_methods = register_methods
    module.register_exporters = register_exporters
    return module


def _plugins(allowlist=None):
    return Plugins(entry_points=False, allowlist=allowlist,
                   extra=[("toy", make_toy_plugin()), ("toy-structure", make_structure_plugin())])


def test_candidates_follow_the_canonical_order_and_the_declared_rules():
    found = candidates(_plugins())
    labels = [c.label for c in found]
    assert "toy-width(ratio=0.25) → toy-mask(sparsity=0.5) → toy-round(bits=4)" in labels
    for candidate in found:
        phases = [m.phase for m, _ in candidate.stages]
        assert phases == sorted(phases)
        assert sum(m.kind == "quantize" for m, _ in candidate.stages) <= 1  # one quantizer per layer
    sizes = [c.size_mb for c in found]
    assert sizes == sorted(sizes)


def test_excluding_a_plugin_with_the_allowlist_changes_the_candidates():
    everything = {c.label for c in candidates(_plugins())}
    without_structure = {c.label for c in candidates(_plugins(allowlist="toy"))}
    assert without_structure < everything
    assert not any("toy-width" in label for label in without_structure)


def test_size_estimate_weighs_the_embedding():
    quantize_decoder = estimate(DEMO_STATS, [SizeEffect(bits=4)])[0]
    fp16 = DEMO_STATS.total * 2 / 1e6
    assert fp16 / quantize_decoder < 4  # the embedding keeps decoder-only 4-bit above a quarter
    both = estimate(DEMO_STATS, [SizeEffect(bits=4), SizeEffect(bits=4, covers="embedding")])[0]
    assert fp16 / both > 3.9


def test_targets_filter_and_rank_by_the_budget():
    found = candidates(_plugins(), budget=PlanBudget(target_size_mb=200))
    assert found and all(c.size_mb <= 200 for c in found)
    assert found[0].size_mb == max(c.size_mb for c in found)


def test_invalid_combinations_are_rejected_with_their_reason():
    plugins = _plugins()
    methods = plugins.methods
    prune, quantize = methods["toy-mask"], methods["toy-round"]
    options = lambda m: m.options()  # noqa: E731
    [(index, reason)] = combination_problems([(quantize, options(quantize)), (prune, options(prune))])
    assert index == 1 and "cannot run after a quantize stage" in reason
    [(index, reason)] = combination_problems([(quantize, options(quantize)), (quantize, options(quantize))])
    assert "two quantize stages would act on the same layers" in reason
    [(index, reason)] = combination_problems([(quantize, options(quantize))], plugins.exporters["dense-only"])
    assert index is None and "cannot represent quantized" in reason


def test_the_planner_exports_quantized_candidates_with_a_packing_format():
    plugins = _plugins()
    quantized = next(c for c in candidates(plugins) if c.label == "toy-round(bits=4)")
    assert choose_exporter(plugins, quantized) == "packed"
    structural = next(c for c in candidates(plugins) if c.label == "toy-width(ratio=0.25)")
    assert choose_exporter(plugins, structural) == "hf"


def test_the_default_recipe_is_a_valid_recipe(tiny_folder):
    plugins = _plugins()
    text = default_recipe_text(plugins, model=str(tiny_folder))
    recipe = parse_recipe(text, plugins)
    assert recipe.stages  # the planner proposed something from the installed methods


def test_a_quantized_embedding_counts_only_where_the_format_packs_it():
    effects = [SizeEffect(bits=4), SizeEffect(bits=4, covers="embedding",
                                              features=frozenset({"quantized", "quantized-embedding"}))]
    packed = estimate(DEMO_STATS, effects, frozenset({"quantized", "quantized-embedding"}))[0]
    written_dense = estimate(DEMO_STATS, effects, frozenset({"quantized"}))[0]
    assert written_dense - packed == pytest.approx(DEMO_STATS.embedding * 12 / 8 / 1e6)


def test_quantized_embedding_is_a_refinement_any_quantized_format_writes_and_packers_win_auto():
    from pocketlm.recipe import rank_exporters

    def exporter(name, packs):
        return Exporter(name, NoOptions, lambda *a: None, represents=frozenset({"dense", "quantized"}) | packs,
                        packs=packs)

    exporters = {"a-dense-embedding": exporter("a-dense-embedding", frozenset({"quantized"})),
                 "b-packs-embedding": exporter("b-packs-embedding", frozenset({"quantized", "quantized-embedding"})),
                 "hf": Exporter("hf", NoOptions, lambda *a: None)}
    ranked = [e.name for e in rank_exporters(exporters, {"quantized", "quantized-embedding"})]
    assert ranked == ["b-packs-embedding", "a-dense-embedding"]   # hf cannot write "quantized" at all
    assert [e.name for e in rank_exporters(exporters, {"quantized"})][0] == "a-dense-embedding"


def test_chart_labels_name_each_stage_and_its_values():
    from pocketlm.plan_eval import short_label

    text = to_toml({"model": {"source": "m"}, "stages": [
        {"method": "rtn", "bits": 8, "group_size": 32, "targets": ["embed"], "ignore": []},
        {"method": "gptq", "bits": 4, "group_size": 32}]})
    assert short_label(text) == "rtn 8/32/[embed] → gptq 4/32"
    assert short_label(to_toml({"model": {"source": "m"}})) == "baseline"


def make_recovery_plugin():
    module = types.ModuleType("toy-recovery")
    module.POCKETLM_API = ">=1.7"

    @hookimpl
    def register_methods(register):
        register(Method("toy-recover", "distill", NoOptions, lambda m, o, c: m, "test-only recovery",
                        effect=lambda o: SizeEffect(recovers=0.5), phase=pocketlm.PHASE_QUANTIZE + 5,
                        needs_before=frozenset({"quantize"}), plan=lambda budget: [{}]))

    module.register_methods = register_methods
    return module


def test_a_recovery_stage_follows_a_quantizer_and_ranks_first_under_a_budget():
    plugins = Plugins(entry_points=False, extra=[("toy", make_toy_plugin()), ("toy-recovery", make_recovery_plugin())])
    found = candidates(plugins, budget=PlanBudget(target_size_mb=200))
    labels = [c.label for c in found]
    assert "toy-recover()" not in labels                      # never alone: nothing to recover
    assert all("toy-round" in label for label in labels if "toy-recover" in label)
    with_recovery = labels.index("toy-round(bits=4) → toy-recover()")
    assert with_recovery < labels.index("toy-round(bits=4)")   # same size, half the prior loss
    recover = plugins.methods["toy-recover"]
    [(index, reason)] = combination_problems([(recover, recover.options())])
    assert index == 0 and reason == ("method 'toy-recover' works on what a quantize stage made, and no quantize "
                                     "stage comes before it")


def test_a_recipe_with_a_recovery_stage_first_names_the_missing_kind(tiny_folder):
    plugins = Plugins(entry_points=False, extra=[("toy", make_toy_plugin()), ("toy-recovery", make_recovery_plugin())])
    with pytest.raises(pocketlm.PocketError) as error:
        parse_recipe(f'[model]\nsource = "{tiny_folder}"\n[[stages]]\nmethod = "toy-recover"\n', plugins,
                     file="recipe.toml")
    assert str(error.value) == ("recipe.toml:4: stages[0].method: method 'toy-recover' works on what a quantize stage "
                                "made, and no quantize stage comes before it\n"
                                "  fix: add a quantize stage before stage 0 (`pocketlm methods` lists them)")
