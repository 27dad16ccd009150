#!/usr/bin/env bash
# Creates the peer environment for the encoder benchmark, separate from pocketlm's: Optimum's
# ONNX export with ONNX Runtime's dynamic int8 quantization, and sentence-transformers' own
# ONNX backend and int8 export. Usage: bash benchmarks/peers/setup_encoder_peers.sh [VENV]
set -euo pipefail
venv=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.venvs/encoder-peers"}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import optimum.onnxruntime, sentence_transformers" 2>/dev/null; then
  echo "$venv"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 >&2
"$venv/bin/pip" install -q "optimum-onnx[onnxruntime]" "sentence-transformers>=5" >&2
echo "$venv"
