"""Registration: names, kinds, phases, ordering constraints, plans and size effects."""

from pocketlm import PHASE_RESTRUCTURE, PHASE_SPARSIFY
from pocketlm.plugins import get_plugins


def test_methods_are_registered_with_their_constraints():
    plugins = get_plugins()
    assert not [p for p in plugins.problems if p.distribution == "pocketlm-prune"]
    for name, phase in [("magnitude", PHASE_SPARSIFY), ("wanda", PHASE_SPARSIFY), ("sparsegpt", PHASE_SPARSIFY),
                        ("prune-width", PHASE_RESTRUCTURE), ("prune-depth", PHASE_RESTRUCTURE)]:
        method = plugins.methods[name]
        assert method.kind == "prune" and method.phase == phase and method.not_after == frozenset({"quantize"})
        plans = method.plan(None)
        assert plans and all(method.options(**p) for p in plans)
        effect = method.effect(method.options(**plans[0]))
        assert effect.features & {"masked", "restructured"}


def test_defaults_and_effects():
    methods = get_plugins().methods
    options = methods["sparsegpt"].options()
    assert (options.block_size, options.damp, options.sparsity, options.ignore) == (128, 0.01, 0.5, ["lm_head"])
    assert methods["wanda"].effect(methods["wanda"].options(pattern="2:4")).sparsity == 0.5
    assert methods["prune-width"].effect(methods["prune-width"].options(mlp_ratio=0.25)).params_removed > 0
