"""The pocketlm conformance kit on ``mixed``: options (and every option set ``plan`` proposes),
every tiny architecture, ignore, determinism, allocations on the layer's device, CUDA against the
CPU (where there is a GPU), the core checkpoint and the hf round trip. A model an earlier stage
pruned is refused (the allocation measures dense weights), so the mask check asserts the refusal."""

import pytest

from pocketlm import PocketError
from pocketlm.testing.conformance import MethodConformance, check_light_registration, check_masks


class TestMixedConformance(MethodConformance):
    method = "mixed"
    # two widths and a budget between them, so the allocation has a choice to make
    options = {"bits_per_weight": 6.0, "bits": [4, 8], "quantizer": "rtn", "size_model": "grid", "resolution": 200}
    defaults_build = False  # the user gives the byte budget (bits_per_weight)

    def test_respects_masks(self, family):
        with pytest.raises(PocketError, match="carries a pruning mask; allocate bits before pruning is not supported"):
            check_masks(self.method, self.options, family)


def test_registration_is_light():
    # `pocketlm validate` loads every plugin: registering this one must import no tensor library
    check_light_registration("pocketlm_mixed")
