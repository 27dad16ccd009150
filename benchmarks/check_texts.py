"""Score ``pocketlm run`` folders of the reference model on two check texts that no stage trains
or calibrates on, besides the recovery benchmark's two (``score_run.py``): a third and a fourth
domain, to see whether a recipe's retention holds beyond the texts it was tuned against.

* ``python-source``: CPython 3.11.7's ``Lib/argparse.py``, Python source code with its
  docstrings and comments;
* ``licenses``: the GNU GPL 3, the Apache License 2.0, the Mozilla Public License 2.0 and the GNU
  FDL 1.3, legal English.

Both are bundled in ``benchmarks/data`` (its README says where they come from). Each is scored on
its first 32 windows of 512 tokens, as the quick protocol scores WikiText-2; retention is the
float32 model's perplexity over the checkpoint's. The float32 row is computed once and kept in
``docs/bench/raw/check_texts.jsonl`` with every run's row:

    python benchmarks/check_texts.py runs/smollm2-80mb --name smollm2-135m-80mb.toml
"""

from __future__ import annotations

import json

import common
import score_run

RESULTS = common.ROOT / "docs" / "bench" / "raw" / "check_texts.jsonl"
TEXTS = {"python_source": common.ROOT / "benchmarks" / "data" / "python-source.txt",
         "licenses": common.ROOT / "benchmarks" / "data" / "licenses.txt"}
WINDOWS = 32


def check_windows(tokenizer) -> dict:
    """The first ``WINDOWS`` windows of ``common.SEQ_LEN`` tokens of each check text."""
    from pocketlm import data

    found = {text: data.evaluation_windows(tokenizer, path, WINDOWS, common.SEQ_LEN) for text, path in TEXTS.items()}
    for text, windows in found.items():
        if windows.shape[0] < WINDOWS:
            raise SystemExit(f"{TEXTS[text]}: {windows.shape[0]} windows of {common.SEQ_LEN} tokens, "
                             f"fewer than {WINDOWS}")
    return found


def perplexities(model, texts: dict) -> dict:
    return {text: round(common.perplexity(model, windows), 3) for text, windows in texts.items()}


def float_row(texts: dict) -> dict:
    """The float32 model's perplexities: the last recorded row, or measured and recorded now (the
    only time the float model is loaded)."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    recorded = [row for row in rows if row.get("row") == "float32"]
    if recorded:
        return recorded[-1]
    original, _ = common.load_reference()
    row = {"row": "float32", "windows": WINDOWS, "seq_len": common.SEQ_LEN, **perplexities(original, texts)}
    common.append_result(RESULTS, row)
    return row


def main() -> None:
    from pocketlm.checkpoint import load_checkpoint

    args, resolved, stage = score_run.open_run(__doc__)
    recipe = resolved["recipe"]
    from transformers import AutoTokenizer

    texts = check_windows(AutoTokenizer.from_pretrained(common.reference_folder()))
    reference = float_row(texts)
    model = load_checkpoint(stage).model
    model.eval()
    row = {"row": args.name, "scored": stage.name, "windows": WINDOWS, "seq_len": common.SEQ_LEN,
           "stages": recipe["stages"], **perplexities(model, texts)}
    for text in texts:
        row[f"retention_{text}"] = round(reference[text] / row[text], 4)
    print(json.dumps({key: value for key, value in row.items() if key != "stages"}))
    common.append_result(RESULTS, row)


if __name__ == "__main__":
    main()
