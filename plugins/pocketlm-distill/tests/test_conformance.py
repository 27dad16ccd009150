"""The core's conformance kit on ``distill`` (and on the options of ``qat``)."""

import subprocess
import sys

from pocketlm.testing.conformance import MethodConformance, check_light_registration, check_options


class TestDistillConformance(MethodConformance):
    method = "distill"
    # The teacher of the kit is a copy of the model (KL = 0), so a little CE makes it train.
    options = {"steps": 2, "batch_size": 2, "ce_weight": 1.0, "lr": 1e-3, "checkpoint_every": 0}
    defaults_build = False  # the user must choose a budget: steps or tokens
    # torch's DataLoader (through accelerate) draws its base seed with a device-less
    # torch.empty(()).random_(), a CPU tensor by design, so the meta-device run cannot pass;
    # distill's own tensors follow accelerator.device and gpu_smoke.sh runs it on CUDA.
    allocations_unchecked = "torch's DataLoader draws its seed on the default device by design"


def test_qat_options_conformance():
    """qat trains the scales a quantizer made, matched to the float original: the kit's runs (on a
    float tiny model, the teacher a copy of it) do not apply, tests/test_qat.py runs it. Its options
    meet the kit's contract (closed, frozen, described, JSON round trip, effect, plan)."""
    check_options("qat", {"epochs": 1})


def test_registration_is_light():
    """Importing the plugin and registering its components imports no tensor library (``validate``
    loads every plugin): the options and effects are light, the methods' code loads when it runs."""
    check_light_registration("pocketlm_distill")


def test_package_names_stay_the_functions_when_the_modules_load_first():
    """``pocketlm_distill.distill`` is the function, as before the package loaded it lazily, even
    when the module of the same name was imported first (as a run's lazy ``compress`` does)."""
    probe = ("import pocketlm_distill.distill, pocketlm_distill.recovery\n"
             "import pocketlm_distill\n"
             "from pocketlm_distill import distill, kd_loss, lr_factor, qat\n"
             "print(pocketlm_distill.distill.__module__, distill.__name__, kd_loss.__name__, lr_factor.__name__,"
             " qat.__module__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["pocketlm_distill.distill", "distill", "kd_loss", "lr_factor",
                                   "pocketlm_distill.recovery"]
