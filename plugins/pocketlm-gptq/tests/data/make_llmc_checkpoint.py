"""Write ``llmc-w4a16-g32/``: a tiny random Llama quantized by llm-compressor itself (GPTQModifier,
W4A16 symmetric group 32), saved compressed (pack-quantized), and beside it
``llmc-w4a16-g32.decompressed.safetensors``: the weights that compressed-tensors' own
decompression computes from that checkpoint (outside the folder, whose every safetensors file
a loader reads as the model's).

Runs in llm-compressor's own environment, never pocketlm's (it does not import pocketlm); the
folder it writes is committed test data for ``tests/test_llmc_checkpoint.py``. Written with
llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0 (CPU):

    bash benchmarks/peers/setup_llmcompressor.sh
    benchmarks/.venvs/llmcompressor/bin/python plugins/pocketlm-gptq/tests/data/make_llmc_checkpoint.py

The model: Llama, hidden 64, 2 layers, intermediate 128, 4 query and 2 key/value heads, tied
embeddings, a byte-level BPE tokenizer of 320 tokens trained on the first 100,000 characters of
the core's bundled WikiText-2 validation text; weights drawn from N(0, 0.08) with seed 0.
Calibration: 8 windows of 64 tokens of that text. ``scale_dtype = float16`` makes llm-compressor
round every scale to float16 before it quantizes (its scales are otherwise stored in the model's
dtype, float32 here, which pocketlm refuses to round).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "llmc-w4a16-g32"
DECOMPRESSED = HERE / "llmc-w4a16-g32.decompressed.safetensors"
TEXT = HERE.parents[3] / "core" / "pocketlm" / "data" / "wikitext-2-valid.txt"
VOCAB, WINDOWS, SEQ = 320, 8, 64


def tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def model(vocab_size: int, folder: Path):
    """The random float model, saved to ``folder`` and loaded back from it the way a user's
    checkpoint is (oneshot reads the config of ``name_or_path``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    llama = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in llama.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    llama.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def calibration(tok, text: str):
    from datasets import Dataset

    ids = tok(text, add_special_tokens=False)["input_ids"][: WINDOWS * SEQ]
    windows = torch.tensor(ids).view(WINDOWS, SEQ)
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})


def quantize(llama, tok, dataset) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
               "scale_dtype": "float16"}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], actorder=None, block_size=128, dampening_frac=0.01)
    oneshot(model=llama, processor=tok, dataset=dataset, recipe=recipe, num_calibration_samples=WINDOWS,
            max_seq_length=SEQ, shuffle_calibration_samples=False)


def save_decompressed(folder: Path, path: Path) -> None:
    """compressed-tensors' own dequantization of the saved checkpoint (transformers loads it with
    ``run_compressed = False``, which decompresses every packed linear): its weights, float32."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(run_compressed=False))
    weights = {f"{name}.weight": module.weight.detach().float().contiguous()
               for name, module in loaded.named_modules()
               if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    save_file(weights, str(path), metadata={"format": "pt"})


def main() -> None:
    import compressed_tensors
    import llmcompressor
    import transformers

    text = TEXT.read_text(encoding="utf-8")[:100_000]
    tok = tokenizer(text)
    with tempfile.TemporaryDirectory() as dense:
        llama = model(len(tok), Path(dense))
        quantize(llama, tok, calibration(tok, text))
        readme = (OUT / "README.md").read_text() if (OUT / "README.md").exists() else None
        shutil.rmtree(OUT, ignore_errors=True)
        llama.save_pretrained(OUT, save_compressed=True)  # reads the dense folder's recipe, if any
        if readme is not None:
            (OUT / "README.md").write_text(readme)
    tok.save_pretrained(OUT)
    save_decompressed(OUT, DECOMPRESSED)
    versions = {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
    (OUT / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    print(json.dumps(versions), sum(p.stat().st_size for p in OUT.iterdir()), "bytes")


if __name__ == "__main__":
    main()
