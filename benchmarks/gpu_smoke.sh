#!/usr/bin/env bash
# GPU smoke test: the README's default recipe and every first-party method on a tiny model on
# `cuda`, for any machine with a CUDA GPU. Well under 10 minutes on one modern GPU.
#
#   bash .ci/setup && bash benchmarks/gpu_smoke.sh
#
# Steps (each must pass; the first failure stops the script with its output):
#   1. a CUDA device is visible to torch (else it fails loudly: this script proves nothing on a CPU);
#   2. the conformance kit's CPU-against-CUDA check and allocation check for rtn, gptq, awq,
#      magnitude, wanda, sparsegpt, prune-width and prune-depth on tiny models (distill in step 3);
#   3. a pipeline run of every method with `device = "cuda"`, offload "none" and "cpu" (and "disk"
#      for the methods that stream), on a tiny llama model, exported (`compressed-tensors`, `gptq`,
#      `awq`, `gguf`);
#   4. the README's default recipe (`pocketlm run`, demo:smollm2-135m) with `device = "cuda"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
POCKETLM=${POCKETLM:-.venv/bin/pocketlm}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pocketlm-gpu-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== 1. CUDA"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_smoke.sh: FAILED: torch sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)'))." >&2
    echo "Run it on a machine with a GPU and a CUDA build of torch; on a CPU it proves nothing." >&2
    exit 1
fi
"$PY" -c 'import torch; print(torch.__version__, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'

echo "== 2. conformance: CUDA against CPU, and allocations, per method"
"$PY" - <<'EOF'
import torch
from pocketlm.testing.conformance import check_allocations, check_cuda_matches_cpu
METHODS = {
    "rtn": {"bits": 4, "group_size": 32}, "gptq": {"bits": 4, "group_size": 32},
    "awq": {"bits": 4, "group_size": 32}, "magnitude": {"sparsity": 0.5}, "wanda": {"sparsity": 0.5},
    "sparsegpt": {"sparsity": 0.5}, "prune-width": {"mlp_ratio": 0.25}, "prune-depth": {"layers": 1},
}  # distill: torch's DataLoader seeds on the default device, so it is checked by the run in step 3
for name, options in METHODS.items():
    for family in ("llama", "gpt2"):
        check_allocations(name, options, family)
        check_cuda_matches_cpu(name, options, family)
        print(f"ok {name} on {family}", flush=True)
EOF

echo "== 3. pipeline runs on cuda, offload none, cpu and disk"
"$PY" -c "from pocketlm.testing.models import save_tiny_model; save_tiny_model('$WORK/tiny', 'llama')"
run_stage() {  # name, offload, stage lines, export format
    cat > "$WORK/$1-$2.toml" <<EOF
[model]
source = "$WORK/tiny"
device = "cuda"
offload = "$2"
[calibration]
samples = 8
seq_len = 64
$3
[evaluate]
metrics = ["perplexity", "size"]
[evaluate.perplexity]
windows = 4
seq_len = 64
[export]
format = "$4"
EOF
    "$POCKETLM" run "$WORK/$1-$2.toml" --run-dir "$WORK/runs/$1-$2"
}
for offload in none cpu disk; do
    run_stage gptq "$offload" $'[[stages]]\nmethod = "gptq"\nbits = 4\ngroup_size = 32' compressed-tensors
    run_stage gptq-gptq "$offload" $'[[stages]]\nmethod = "gptq"\nbits = 4\ngroup_size = 32' gptq
    run_stage rtn "$offload" $'[[stages]]\nmethod = "rtn"\nbits = 4\ngroup_size = 32' gguf
    run_stage awq "$offload" $'[[stages]]\nmethod = "awq"\nbits = 4\ngroup_size = 32' awq
    run_stage sparsegpt-gptq "$offload" $'[[stages]]\nmethod = "sparsegpt"\nsparsity = 0.5\n[[stages]]\nmethod = "gptq"\nbits = 4\ngroup_size = 32' compressed-tensors
    run_stage wanda "$offload" $'[[stages]]\nmethod = "wanda"\nsparsity = 0.5' hf
    [ "$offload" = disk ] && continue   # below: methods that need the whole model (they refuse disk)
    run_stage magnitude "$offload" $'[[stages]]\nmethod = "magnitude"\nsparsity = 0.5' hf
    run_stage width-depth "$offload" $'[[stages]]\nmethod = "prune-width"\nmlp_ratio = 0.25\n[[stages]]\nmethod = "prune-depth"\nlayers = 1' hf
done
run_stage distill none $'[[stages]]\nmethod = "magnitude"\nsparsity = 0.5\n[[stages]]\nmethod = "distill"\nsteps = 4\nbatch_size = 2' hf
run_stage distill-bf16 none $'[[stages]]\nmethod = "distill"\nsteps = 4\nbatch_size = 2\nmixed_precision = "bf16"' hf
run_stage qat-bf16 none $'[[stages]]\nmethod = "gptq"\nbits = 4\ngroup_size = 32\n[[stages]]\nmethod = "qat"\nepochs = 0\ne2e_steps = 4\ne2e_mixed_precision = "bf16"' gguf

echo "== 4. the README's default recipe on cuda"
"$PY" - "$WORK/default.toml" <<'EOF'
import sys
from pocketlm.planner import default_recipe_text
from pocketlm.plugins import get_plugins
text = default_recipe_text(get_plugins())   # what `pocketlm run` with no recipe runs
assert "[model]\n" in text
open(sys.argv[1], "w").write(text.replace("[model]\n", '[model]\ndevice = "cuda"\n', 1))
EOF
"$POCKETLM" run "$WORK/default.toml" --run-dir "$WORK/runs/default"
echo "gpu_smoke.sh: all steps passed"
