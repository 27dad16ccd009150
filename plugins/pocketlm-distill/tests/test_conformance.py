"""The core's conformance kit on ``distill``."""

from pocketlm.testing.conformance import MethodConformance


class TestDistillConformance(MethodConformance):
    method = "distill"
    # The teacher of the kit is a copy of the model (KL = 0), so a little CE makes it train.
    options = {"steps": 2, "batch_size": 2, "ce_weight": 1.0, "lr": 1e-3, "checkpoint_every": 0}
    defaults_build = False  # the user must choose a budget: steps or tokens
