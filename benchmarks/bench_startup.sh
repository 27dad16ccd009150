#!/usr/bin/env bash
# Start-up time of the command line: `pocketlm --help` and `pocketlm validate` of a GPTQ + GGUF
# recipe, ten runs each, wall-clock and CPU seconds. Timing: run it under the benchmark lock.
#
#   flock /tmp/pocketlm-bench.lock bash benchmarks/bench_startup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=$(mktemp --suffix=.toml)
trap 'rm -f "$recipe"' EXIT
cat > "$recipe" <<'TOML'
[model]
source = "demo:smollm2-135m"
[[stages]]
method = "gptq"
bits = 4
group_size = 64
[evaluate]
metrics = ["perplexity", "size", "kl-divergence"]
[export]
format = "gguf"
TOML
pocketlm=${VENV:-.venv}/bin/pocketlm
"$pocketlm" validate "$recipe" > /dev/null  # warm the file cache
for command in "--help" "validate $recipe"; do
  for run in $(seq 10); do
    /usr/bin/time -f "${command%% *} %e %U %S" "$pocketlm" $command > /dev/null
  done
done 2>&1 | awk '{wall[$1] = wall[$1] " " $2; cpu[$1] = cpu[$1] " " sprintf("%.2f", $3 + $4)}
  END {for (c in wall) print c ": wall s" wall[c] "\n" c ": cpu s " cpu[c]}'
