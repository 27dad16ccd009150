"""llm-compressor GPTQ as a peer: runs pocketlm-gptq's stand-alone worker script inside
llm-compressor's own venv (it imports only the standard library, torch, transformers, datasets,
safetensors and llmcompressor, never pocketlm). See that file for the arguments:
plugins/pocketlm-gptq/src/pocketlm_gptq/llmc_worker.py

    benchmarks/.venvs/llmcompressor/bin/python benchmarks/peers/llmc_gptq.py --model DIR \
        --windows calib.safetensors --out DIR --result r.json --bits 4 --group-size 64
"""

import runpy
from pathlib import Path

WORKER = Path(__file__).resolve().parents[2] / "plugins" / "pocketlm-gptq" / "src" / "pocketlm_gptq" / "llmc_worker.py"

if __name__ == "__main__":
    runpy.run_path(str(WORKER), run_name="__main__")
