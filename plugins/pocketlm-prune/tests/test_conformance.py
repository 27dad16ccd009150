"""The pocketlm conformance kit on every pruner: options, every tiny architecture, masks, ignore,
determinism, allocations on the layer's device, CUDA against the CPU (where there is a GPU), the
core checkpoint and the hf round trip."""

from pocketlm.testing.conformance import MethodConformance, check_light_registration


class TestMagnitudeConformance(MethodConformance):
    method = "magnitude"
    options = {"sparsity": 0.5}


class TestWandaConformance(MethodConformance):
    method = "wanda"
    options = {"sparsity": 0.5}


class TestSparseGPTConformance(MethodConformance):
    method = "sparsegpt"
    options = {"sparsity": 0.5}


class TestWidthConformance(MethodConformance):
    method = "prune-width"
    options = {"mlp_ratio": 0.25}
    defaults_build = False  # the user says how much to remove: mlp_ratio, intermediate_size, head_ratio or kv_heads


class TestWidthHeadsConformance(MethodConformance):
    method = "prune-width"
    options = {"mlp_ratio": 0.25, "head_ratio": 0.5}
    defaults_build = False
    unsupported = {
        "gpt2": "GPT-2's config derives the head width from hidden_size / heads: transformers could not reload a "
                "head-pruned model (the method refuses with a PocketError)",
        "opt": "OPT's config derives the head width from hidden_size / heads (same as GPT-2)"}


class TestDepthConformance(MethodConformance):
    method = "prune-depth"
    options = {"layers": 1}


def test_registration_is_light():
    """Importing the plugin and registering its components imports no tensor library (``validate``
    loads every plugin): the options and effects are light, the methods' code loads when it runs."""
    check_light_registration("pocketlm_prune")
