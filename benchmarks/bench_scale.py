"""Scale benchmark: offload = "disk" against "none" (see docs/bench/scale.md for results).

* ``synthetic``: write a random Llama with TinyLlama-1.1B's shape (hidden 2048, intermediate
  5632, 22 layers, 32 heads, 4 KV heads, vocab 32000, untied head) as float32 safetensors, one
  shard per layer (about 4.4 GB), under ``--cache`` (default ``benchmarks/.cache/scale``). Its
  tokenizer is pocketlm's tiny byte-level test tokenizer (256 tokens; the weights are random, so
  only the shapes and the memory matter).
* ``memory --offload disk|none``: GPTQ W4 g128, 8 x 512 calibration windows run one window per
  forward pass (``batch_size = 1``: a layer's attention and MLP intermediates for one window,
  not eight), export compressed-tensors, on the synthetic model, in a child process whose resident memory is
  sampled every 50 ms from ``/proc/PID/status`` (RssAnon and RssFile apart); its peak is the
  child's own high-water mark (VmHWM; ``wait4``'s ru_maxrss is kept beside it, but it includes
  the parent's peak, which a child inherits at exec). ``compare`` checks that two memory runs exported the same
  grids, tensor by tensor.
  After the run, the GPTQ stage is exported again as GGUF (``pocketlm export STAGE --format
  gguf``) in a second sampled child.
* ``export --offload disk|none``: only the second step of ``memory``: ``pocketlm export STAGE
  --format gguf`` of the GPTQ stage an earlier ``memory`` run with that offload left under
  ``--cache`` (made first when it is missing), in a sampled child.
* ``peer --offload disk|none``: llm-compressor 0.14's GPTQ (W4 g128, act-order static, damp 0.01,
  block 128) on the same model and the same 8 x 512 windows (pocketlm's own calibration windows
  handed over as token ids), in its own venv (``benchmarks/peers/setup_llmcompressor.sh``):
  its default path (the whole model in CPU memory) or its disk offload
  (``load_offloaded_model``, ``device_map = "auto_offload"`` with 1 GB of weights allowed in
  CPU memory), sampled the same way.
* ``side-by-side``: ``memory`` with ``disk`` then ``none``, ``compare``, then ``peer`` with
  ``disk`` then ``none``, one after another in one invocation (its rows share ``invocation``).
* ``profile --layers N``: the same GPTQ walk over the first N layers in this process, with the
  peak memory of each phase (load, each group's solve, the passes between, writing the layer).
* ``cost``: SmolLM2-135M (``demo:smollm2-135m``), GPTQ W4 g64, the quick protocol's 32 x 512
  calibration windows, ``disk`` and ``none`` one after the other in the same invocation; the
  stage's seconds from each run's report.

Run the memory and cost runs under ``flock /tmp/pocketlm-bench.lock`` on a shared machine.
Results are appended to ``docs/bench/scale-results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "bench" / "scale-results.jsonl"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)

MEMORY_RECIPE = """[model]
source = "{model}"
offload = "{offload}"
[calibration]
samples = 8
seq_len = 512
batch_size = 1
seed = 0
[[stages]]
method = "gptq"
bits = 4
group_size = 128
[evaluate]
metrics = ["size"]
before = false
per_stage = ["size"]
[export]
format = "compressed-tensors"
"""

COST_RECIPE = """[model]
source = "demo:smollm2-135m"
offload = "{offload}"
[calibration]
samples = 32
seq_len = 512
seed = 0
[[stages]]
method = "gptq"
bits = 4
group_size = 64
[evaluate]
metrics = []
before = false
per_stage = []
[export]
format = "compressed-tensors"
"""


def write_synthetic(folder: Path) -> Path:
    """The random TinyLlama-shaped model, one float32 shard per decoder layer plus one for the
    rest, written tensor by tensor (the generator never holds more than one layer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from pocketlm import streaming
    from pocketlm.testing.models import tiny_tokenizer

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE)
    shell = streaming.build_shell(config, torch.float32)
    generator = torch.Generator().manual_seed(0)
    state = {k: v for k, v in shell.state_dict().items()}
    layers = config.num_hidden_layers
    weight_map, total = {}, 0
    for number in range(layers + 1):
        prefix = f"model.layers.{number - 1}." if number else None
        names = [k for k in state if (k.startswith(prefix) if prefix else not k.startswith("model.layers."))]
        tensors = {}
        for name in names:
            shape = state[name].shape
            tensors[name] = torch.ones(shape) if name.endswith("norm.weight") else \
                torch.randn(shape, generator=generator) * 0.02
        file = f"model-{number + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        total += sum(t.numel() * 4 for t in tensors.values())
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return folder


class Sampler(threading.Thread):
    """Peak VmRSS, RssAnon and RssFile of a process, from /proc/PID/status every 50 ms, and the
    three at the moment of the highest VmRSS (each column's own peak may fall elsewhere)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, False
        self.peaks = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        self.at_peak: dict[str, int] = {}

    def run(self):
        while not self.stop:
            try:
                now = {}
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self.peaks:
                        now[key] = int(value.split()[0]) * 1024
            except (FileNotFoundError, ProcessLookupError):
                return
            if now.get("VmRSS", 0) > self.peaks["VmRSS"]:
                self.at_peak = now
            self.peaks = {k: max(v, now.get(k, 0)) for k, v in self.peaks.items()}
            time.sleep(0.05)


def sampled(command: list[str], name: str) -> dict:
    """Run ``command`` in a child process; its wall time and peak memory (ru_maxrss from wait4,
    VmRSS/RssAnon/RssFile sampled every 50 ms)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = Sampler(process.pid)
    sampler.start()
    stderr = process.stderr.read()   # read until the child exits, so a chatty child never blocks on the pipe
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = status      # reaped here (wait4 gives its rusage), not by Popen
    wall = time.perf_counter() - start
    sampler.stop = True
    if status != 0:
        raise SystemExit(f"{name} failed: {stderr.decode()[-3000:]}")
    # VmHWM is the child's own high-water mark. ru_maxrss is not: a child started by vfork
    # inherits the parent's peak at exec, so it reads at least the parent's.
    return {"wall_s": round(wall, 1), "peak_rss_mb": round((sampler.peaks["VmHWM"] or usage.ru_maxrss * 1024) / 2**20, 1),
            "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
            **{f"peak_{k}_mb": round(v / 2**20, 1) for k, v in sampler.peaks.items()},
            "at_peak_mb": {k: round(v / 2**20, 1) for k, v in sampler.at_peak.items()}}


POCKETLM = [sys.executable, "-c", "from pocketlm.cli import main; main()"]


def run_recipe(recipe: str, run_dir: Path, name: str) -> dict:
    """Run ``recipe`` with the pocketlm CLI in a child process; its wall time and memory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{name}.toml"
    path.write_text(recipe)
    result = sampled([*POCKETLM, "run", str(path), "--run-dir", str(run_dir), "--overwrite"], name)
    report = json.loads((run_dir / "report.json").read_text())
    return {**result, "stage_s": round(report["stages"][0]["seconds"], 1), "size_mb": report["after"].get("size_mb")}


def export_gguf(stage: Path, out: Path) -> dict:
    """``pocketlm export STAGE --format gguf`` in a sampled child (the stage checkpoint, streamed
    or whole, is loaded as a streamed model and written one layer at a time)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    result = sampled([*POCKETLM, "export", str(stage), "--format", "gguf", "-o", str(out)], "gguf export")
    return {**result, "gguf_mb": round((out / "model.gguf").stat().st_size / 1e6, 1)}


def peer_windows(model: Path, out: Path) -> Path:
    """pocketlm's own calibration windows of the memory recipe (8 x 512, seed 0, the bundled
    WikiText-2 validation text through the model's tokenizer), as token ids for the peer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from pocketlm import data

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = data.calibration_windows(tokenizer, data.resolve_text(data.DEFAULT_CALIBRATION_TEXT), 8, 512, 0)
    save_file({"input_ids": ids.contiguous()}, str(out))
    return out


def run_peer(model: Path, offload: str, cache: Path) -> dict:
    import shutil

    venv = subprocess.run(["bash", str(ROOT / "benchmarks" / "peers" / "setup_llmcompressor.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    work = cache / f"peer-{offload}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    windows = peer_windows(model, work / "windows.safetensors")
    command = [f"{venv}/bin/python", str(ROOT / "benchmarks" / "peers" / "llmc_scale.py"), "--model", str(model),
               "--windows", str(windows), "--out", str(work / "export"), "--result", str(work / "result.json"),
               "--offload", offload, "--offload-folder", str(work / "offload"), "--group-size", "128"]
    result = sampled(command, f"llm-compressor ({offload})")
    inner = json.loads((work / "result.json").read_text())
    shutil.rmtree(work / "offload", ignore_errors=True)
    return {**result, **{k: v for k, v in inner.items() if k != "peak_rss_mb"}}


def compare_exports(a: Path, b: Path) -> dict:
    """Tensor-by-tensor equality of two exports (read one tensor at a time)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        where = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                where.update({k: file for k in handle.keys()})
        return where

    left, right = index(a), index(b)
    differing = []
    for key in sorted(left):
        with safe_open(str(left[key]), "pt") as x, safe_open(str(right[key]), "pt") as y:
            if not (x.get_tensor(key) == y.get_tensor(key)).all():
                differing.append(key)
    return {"tensors": len(left), "same_names": sorted(left) == sorted(right), "differing": differing[:10],
            "identical": sorted(left) == sorted(right) and not differing}


def profile_layers(model: Path, layers: int) -> dict:
    """GPTQ W4 g128 over the first ``layers`` decoder layers of the streamed synthetic model, in
    this process, with the peak VmRSS/RssAnon/RssFile of each phase (sampled every 10 ms): where
    the memory of one layer at work goes. Same windows and batch size as ``memory``."""
    import re

    import torch

    import pocketlm.calibration as calibration
    import pocketlm_gptq.gptq as gptq
    from pocketlm import streaming
    from pocketlm.context import CalibrationSpec
    from pocketlm.testing import make_context

    phase, peaks = ["start"], {}

    def status() -> dict:
        text = Path("/proc/self/status").read_text()
        return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "RssAnon", "RssFile")}

    def sample():
        while True:
            now, name = status(), phase[0]
            old = peaks.setdefault(name, now)
            peaks[name] = {k: max(old[k], now[k]) for k in now}
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    torch.set_num_threads(2)
    shell = streaming.load_streamed(model, torch.float32)
    phase[0] = "loaded (embedding and head file-backed)"
    solve, quantize, hand_back = gptq.GPTQHandler.solve, gptq.gptq_quantize, calibration._hand_back

    def timed_solve(self, index, layer, names):
        phase[0] = f"solve {names[-1].split('.')[-1]}"
        solve(self, index, layer, names)
        phase[0] = f"walk after {names[-1].split('.')[-1]}"

    def timed_hand_back(stream, index, outputs, resumable):
        phase[0] = "write and free the layer"
        result = hand_back(stream, index, outputs, resumable=resumable)
        if index + 1 >= layers:
            raise StopIteration
        return result

    gptq.GPTQHandler.solve, calibration._hand_back = timed_solve, timed_hand_back
    windows = torch.randint(3, 250, (8, 512), generator=torch.Generator().manual_seed(0))
    context = make_context(windows)
    context.calibration = CalibrationSpec(Path("unused: the windows are given"), 8, 512, 0, 1)   # batch 1
    try:
        gptq.compress_gptq(shell, gptq.GPTQOptions(bits=4, group_size=128), context)
    except StopIteration:
        pass
    time.sleep(0.05)
    return {"layers": layers, "phases": peaks,
            "peak_rss_mb": max(v["VmRSS"] for v in peaks.values())}


def record(row: dict) -> None:
    import torch

    row = {"date": datetime.now(timezone.utc).date().isoformat(), "commit": _commit(), "torch": torch.__version__, **row}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


def memory(model: Path, cache: Path, offload: str, invocation: str) -> None:
    write_synthetic(model)
    result = run_recipe(MEMORY_RECIPE.format(model=model, offload=offload), cache / f"run-{offload}", f"memory-{offload}")
    float_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    gguf = export_gguf(cache / f"run-{offload}" / "stages" / "01-gptq", cache / f"gguf-{offload}")
    record({"benchmark": "memory", "invocation": invocation, "offload": offload,
            "model": "synthetic TinyLlama-1.1B shape, float32",
            "model_mb": round(float_bytes / 2**20, 1), "recipe": "gptq W4 g128, 8 x 512 windows, compressed-tensors",
            "peak_over_model": round(result["peak_rss_mb"] * 2**20 / float_bytes, 3), **result,
            "gguf_export": {**gguf, "peak_over_model": round(gguf["peak_rss_mb"] * 2**20 / float_bytes, 3)}})


def export_only(model: Path, cache: Path, offload: str, invocation: str) -> None:
    """The GGUF export of the stage a ``memory`` run left, measured alone (the run first when
    its stage is missing)."""
    import hashlib

    write_synthetic(model)
    stage = cache / f"run-{offload}" / "stages" / "01-gptq"
    if not (stage / "stage.json").is_file():
        run_recipe(MEMORY_RECIPE.format(model=model, offload=offload), cache / f"run-{offload}", f"memory-{offload}")
    float_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    gguf = export_gguf(stage, cache / f"gguf-{offload}")
    digest = hashlib.sha256()
    with open(cache / f"gguf-{offload}" / "model.gguf", "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    record({"benchmark": "gguf-export", "invocation": invocation, "offload": offload,
            "stage": "streamed (layers/)" if (stage / "layers").is_dir() else "whole (model.safetensors)",
            "model": "synthetic TinyLlama-1.1B shape, float32", "model_mb": round(float_bytes / 2**20, 1),
            "peak_over_model": round(gguf["peak_rss_mb"] * 2**20 / float_bytes, 3), **gguf,
            "gguf_sha256": digest.hexdigest()})


def peer(model: Path, cache: Path, offload: str, invocation: str) -> None:
    write_synthetic(model)
    float_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    result = run_peer(model, offload, cache)
    record({"benchmark": "memory-peer", "invocation": invocation, "peer": "llm-compressor", "offload": offload,
            "model": "synthetic TinyLlama-1.1B shape, float32", "model_mb": round(float_bytes / 2**20, 1),
            "recipe": "GPTQModifier W4 g128 sym, actorder static, damp 0.01, block 128, 8 x 512 windows (pocketlm's), "
                      "batch 1, save_compressed",
            "peak_over_model": round(result["peak_rss_mb"] * 2**20 / float_bytes, 3), **result})


def compare(cache: Path, invocation: str) -> None:
    result = compare_exports(cache / "run-none" / "export", cache / "run-disk" / "export")
    record({"benchmark": "memory-grids", "invocation": invocation, "model": "synthetic TinyLlama-1.1B shape", **result})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["synthetic", "memory", "export", "compare", "cost", "profile", "peer",
                                         "side-by-side"])
    parser.add_argument("--layers", type=int, default=2, help="profile: decoder layers to walk")
    parser.add_argument("--offload", choices=["disk", "none"], default="disk")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "scale")
    args = parser.parse_args()
    model = args.cache / "synthetic-tinyllama"
    invocation = datetime.now(timezone.utc).isoformat(timespec="seconds")  # rows of one invocation share it
    if args.what == "synthetic":
        print(write_synthetic(model))
    elif args.what == "memory":
        memory(model, args.cache, args.offload, invocation)
    elif args.what == "export":
        export_only(model, args.cache, args.offload, invocation)
    elif args.what == "peer":
        peer(model, args.cache, args.offload, invocation)
    elif args.what == "side-by-side":  # the memory table in one invocation, one run after another
        for offload in ("disk", "none"):
            memory(model, args.cache, offload, invocation)
        compare(args.cache, invocation)
        for offload in ("disk", "none"):
            peer(model, args.cache, offload, invocation)
    elif args.what == "profile":
        write_synthetic(model)
        record({"benchmark": "layer-profile", "model": "synthetic TinyLlama-1.1B shape, float32, offload disk",
                "recipe": "gptq W4 g128, 8 x 512 windows, batch 1", **profile_layers(model, args.layers)})
    elif args.what == "compare":
        compare(args.cache, invocation)
    else:
        rows = {}
        for offload in ("none", "disk"):
            rows[offload] = run_recipe(COST_RECIPE.format(offload=offload), args.cache / f"cost-{offload}", f"cost-{offload}")
        grids = compare_exports(args.cache / "cost-none" / "export", args.cache / "cost-disk" / "export")
        record({"benchmark": "cost", "model": "SmolLM2-135M (demo:smollm2-135m)",
                "recipe": "gptq W4 g64, 32 x 512 windows, compressed-tensors", "none": rows["none"], "disk": rows["disk"],
                "stage_ratio": round(rows["disk"]["stage_s"] / rows["none"]["stage_s"], 3),
                "wall_ratio": round(rows["disk"]["wall_s"] / rows["none"]["wall_s"], 3),
                "grids_identical": grids["identical"]})


if __name__ == "__main__":
    main()
