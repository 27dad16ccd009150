#!/usr/bin/env bash
# Creates the peer environment for llm-compressor, separate from pocketlm's, so that a peer is
# never a dependency of pocketlm. Usage: bash benchmarks/peers/setup_llmcompressor.sh [VENV]
set -euo pipefail
venv=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.venvs/llmcompressor"}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llmcompressor" 2>/dev/null; then
  echo "$venv"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 >&2
"$venv/bin/pip" install -q "llmcompressor==0.14.*" gguf >&2
echo "$venv"
