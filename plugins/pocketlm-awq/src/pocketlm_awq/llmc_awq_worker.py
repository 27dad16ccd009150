"""Run llm-compressor's AWQ (AWQModifier smoothing + QuantizationModifier rounding) on a model
folder with given calibration token windows.

Runs inside llm-compressor's own environment (named by ``POCKETLM_LLMCOMPRESSOR_PYTHON``), never
in pocketlm's, and imports nothing from pocketlm. pocketlm-awq's ``backend = "llmcompressor"``
starts it through ``pocketlm.external.run_worker``: the request is a JSON object on stdin, the
reply a JSON object written to the file named by the first argument::

    request: {"model": DIR, "windows": "calib.safetensors", "out": DIR, "grids": "grids.safetensors",
              "bits": 4, "group_size": 32, "symmetric": true, "duo_scaling": true, "n_grid": 20,
              "targets": ["re:^model.layers.0.self_attn.q_proj$", ...], "threads": 2}
    reply:   {"seconds": ..., "peak_rss_mb": ..., "llmcompressor": "0.14.0", "quantized": [NAME, ...]}

It writes:

* ``out``: the compressed-tensors (``pack-quantized``) folder llm-compressor saves, with every
  dense tensor AWQ changed (norm weights, rescaled linears that are not quantized);
* ``grids``: for every quantized linear ``NAME``, plain tensors ``NAME.q`` (uint8 ``[out, in]``,
  unsigned grid ``0 .. 2**bits-1``), ``NAME.scale`` (float32 ``[out, groups]``) and ``NAME.zero``
  (uint8 ``[out, groups]``, unsigned), so that ``w = (q - zero) * scale``; unpacked from the
  saved folder with compressed-tensors' own ``unpack_from_int32``.

On a machine without an accelerator, llm-compressor 0.14's AWQ smoothing calls
``IntermediatesCache.pin_memory``, which raises "Cannot access accelerator device when none is
available"; it is replaced by a no-op there (pinning only speeds up host-to-device copies).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

#: Request keys that may be left out, with their values ("model", "windows", "out", "grids" and
#: "targets" are required).
DEFAULTS = {"bits": 4, "group_size": 128, "symmetric": True, "duo_scaling": True, "n_grid": 20, "threads": 2}


def quantize(request: dict) -> dict:
    """AWQ of ``request["model"]`` into ``request["out"]`` and ``request["grids"]``; returns the reply."""
    args = {**DEFAULTS, **request}

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None

    torch.manual_seed(0)
    torch.set_num_threads(args["threads"])
    ids = load_file(args["windows"])["input_ids"].long()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32).eval()
    has_tokenizer = (Path(args["model"]) / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(args["model"]) if has_tokenizer else None
    processor = tokenizer
    if processor is None:  # the windows are already token ids; oneshot only insists on a processor
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                            unk_token="<unk>", pad_token="<unk>")
    weights = {"num_bits": args["bits"], "type": "int", "symmetric": args["symmetric"],
               "strategy": "channel" if args["group_size"] == -1 else "group"}
    if args["group_size"] != -1:
        weights["group_size"] = args["group_size"]
    recipe = [AWQModifier(duo_scaling=args["duo_scaling"], n_grid=args["n_grid"]),
              QuantizationModifier(ignore=[], config_groups={"group_0": {"targets": args["targets"], "weights": weights}})]
    start = time.perf_counter()
    oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    model.save_pretrained(args["out"], save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(args["out"])

    tensors = {}
    for file in sorted(Path(args["out"]).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    offset = 2 ** (args["bits"] - 1)
    grids, names = {}, []
    for key in sorted(tensors):
        if not key.endswith(".weight_scale"):
            continue
        name = key[: -len(".weight_scale")]
        scale = tensors[key].float()
        if name + ".weight_packed" in tensors:  # pack-quantized (up to 4 bits)
            shape = torch.Size(tensors[name + ".weight_shape"].tolist())
            q = unpack_from_int32(tensors[name + ".weight_packed"], args["bits"], shape).to(torch.int32) + offset
        else:  # int-quantized (8 bits): the signed grid is stored as an int8 "weight"
            q = tensors[name + ".weight"].to(torch.int32) + offset
            shape = q.shape
        if name + ".weight_zero_point" in tensors:
            zp = tensors[name + ".weight_zero_point"]
            if zp.dtype == torch.int32:  # packed along the output dimension
                zp = unpack_from_int32(zp, args["bits"], torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
            zero = zp.to(torch.int32) + offset
        else:  # symmetric: compressed-tensors drops the (all-zero) signed zero point
            zero = torch.full(scale.shape, offset, dtype=torch.int32)
        if name + ".weight_g_idx" in tensors:
            raise SystemExit(f"{name}: unexpected weight_g_idx (activation reordering) in the output")
        grids[name + ".q"] = q.to(torch.uint8).contiguous()
        grids[name + ".scale"] = scale.reshape(shape[0], -1).contiguous()
        grids[name + ".zero"] = zero.reshape(shape[0], -1).to(torch.uint8).contiguous()
        names.append(name)
    save_file(grids, args["grids"])
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "llmcompressor": llmcompressor.__version__, "quantized": names}


if __name__ == "__main__":
    reply = quantize(json.load(sys.stdin))
    with open(sys.argv[1], "w") as handle:
        json.dump(reply, handle)
