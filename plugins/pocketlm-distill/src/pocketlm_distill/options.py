"""What ``validate`` and ``plan`` read without a model: the options of ``distill`` and ``qat``,
their size effects and ``qat``'s plans. This module imports no tensor library, so registering the
plugin stays cheap; :mod:`.distill`, :mod:`.recovery` and :mod:`.encoder` import from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pocketlm import Options, SizeEffect


class DistillOptions(Options):
    """Options of ``distill``."""

    teacher: str | None = Field(None, description="a model source; null: the model before the first stage")
    teachers: list[str] | None = Field(None, description="several model sources; their targets are averaged")
    text: str | None = Field(None, description="training text file (a relative path is taken from the recipe's "
                             "folder); null: the recipe's calibration text")
    seq_len: int | None = Field(None, description="tokens per example; null: the calibration seq_len "
                                   "(encoders: the pooling's max_seq_length, else 256)")
    steps: int | None = Field(None, description="optimizer steps (give steps or tokens)")
    tokens: int | None = Field(None, description="a training token budget instead of steps")
    batch_size: int = Field(8, description="global micro-batch (examples), split over processes")
    grad_accum: int = Field(1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, description="peak learning rate (Minitron's rate for KD recovery)")
    min_lr_ratio: float = Field(0.1, description="the cosine schedule decays to lr * min_lr_ratio")
    average_last: float = Field(0.0, ge=0, lt=1, description="the trained parameters end as the mean of their "
                                "values after each of the last average_last share of the steps (a tail "
                                "average, as SWA and LAWA take), which evens out the noise of small batches; "
                                "0: the last step's values")
    mixed_precision: Literal["no", "bf16", "auto"] = Field(
        "no", description="bf16: the forward passes of the training steps (student and teachers) run under "
        "torch.autocast in bfloat16, and the scales' head with them, while the trained parameters, their "
        "gradients' sums and the optimizer state stay float32 (accelerate's and transformers' bf16 mixed "
        "precision); faster where the device multiplies bfloat16 natively (recent GPUs, CPUs with AMX), "
        "slower where it converts (CPUs with AVX512-BF16 alone, or none). no: float32 throughout. auto: bf16 "
        "where the device multiplies bfloat16 natively, float32 elsewhere (the run's first line says which)")
    warmup_steps: int | None = Field(None, description="linear warm-up steps; null: 5% of the steps, at most 100")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    max_grad_norm: float = Field(1.0, description="gradient clipping norm; 0 disables clipping")
    temperature: float = Field(1.0, description="softmax temperature of the logit KL")
    kl_weight: float | None = Field(
        None, description="Weight of the KL divergence between the teacher's and the student's logits at "
        "the temperature (a masked-LM encoder: on the masked positions). None: 1 for a model with a head "
        "(causal LM, masked LM), 0 for a bare sentence encoder, which has no logits.")
    ce_weight: float = Field(0.0, description="weight of the cross-entropy on the true tokens (masked-LM: on the masked ones)")
    hidden_weight: float = Field(0.0, description="weight of the hidden-state loss over layer_map")
    layer_map: dict[str, int] | None = Field(None, description="student layer -> teacher layer for the hidden-state "
                                              "loss, e.g. {\"0\": 1, \"1\": 3}")
    embedding_weight: float | None = Field(
        None, description="Weight of the loss between the student's and the teacher's pooled sentence "
        "embeddings (encoders only). None: 1 for a bare sentence encoder, 0 otherwise.")
    embedding_loss: Literal["cosine", "mse"] = Field(
        "cosine", description="How sentence embeddings are compared: cosine (1 - cos, the direction "
        "retrieval uses) or mse (per coordinate, after the model's own normalization if it has one).")
    similarity_weight: float = Field(
        0.0, ge=0, description="Weight of the relational loss (encoders only): the cosine similarities between the "
        "texts of each micro-batch, student's against teacher's (mean squared difference over pairs).")
    texts: Literal["chunks", "pairs"] = Field(
        "chunks", description="What an encoder trains on (encoders only). chunks: runs of 1 to 4 consecutive "
        "sentences of each paragraph of the training text, shuffled, so a micro-batch holds mostly unrelated "
        "texts. pairs: each paragraph of 3 or more sentences of the training text as a (query, passage) pair, its "
        "first sentence and the rest of it (built as the retrieval evaluator builds its pairs, from the "
        "training text, not the evaluation text), whole pairs shuffled with the seed, so each "
        "micro-batch holds batch_size / 2 queries each beside its own passage and similarity_weight learns how "
        "related texts relate; needs an even batch_size.")
    queries: Literal["first", "every"] = Field(
        "first", description="texts = pairs: which sentences of a paragraph are queries. first: its first sentence "
        "(the retrieval evaluator's construction). every: each sentence in turn against the rest of its "
        "paragraph, about five times the pairs from the same text (WikiText-2 validation: 6,849 against "
        "1,296), so a long run sees more distinct texts and fewer repeats.")
    generated_windows: int = Field(
        0, ge=0, description="Causal LMs: this many more windows of seq_len tokens that the (first) teacher "
        "writes itself, LLM-QAT's data-free distillation data: each starts from a token drawn uniformly from the "
        "vocabulary and goes on by sampling the teacher's own next-token distribution at temperature 1, "
        "seeded. They follow the text's windows, so the student learns the teacher's distribution and not one "
        "text's. Written once to the stage folder and reused by a resumed run. 0: none.")
    generated_only: bool = Field(
        False, description="Train on the generated windows alone, no text (data-free); needs generated_windows.")
    hidden_loss: Literal["mse", "cosine"] | None = Field(
        None, description="How the hidden states of layer_map are compared: mse, or cosine per token "
        "(DistilBERT). None: mse for a causal LM, cosine for an encoder. Encoders compare real tokens only.")
    mlm_probability: float = Field(
        0.15, description="Masked-LM encoders: share of each example's real tokens that are predicted "
        "(BERT: 15%, of which 80% become the mask token, 10% a random token, 10% stay).")
    student_layers: Literal["spread"] | list[int] | None = Field(
        None, description="Make the student from the model by keeping only these of its layers (teacher "
        "layer indices, in order) before training, DistilBERT's initialisation: 'spread' keeps half, "
        "spread from the first layer to the last. Needs a model as deep as its teacher; the hidden-state "
        "layer_map then defaults to student layer i -> kept teacher layer. None: the model keeps its layers.")
    quantized: Literal["ste", "freeze", "scales"] = Field(
        "ste", description="quantized linears: train through a straight-through estimator on their own grid (ste), "
        "keep them fixed (freeze), or train only their scales with the integer grid fixed (scales, as qat does; "
        "there a quantized embedding trains its scales too, shared with its tied head, unless freeze names it)")
    freeze: list[str] = Field([], description="parameter name patterns kept fixed (e.g. model.embed_tokens)")
    teacher_correction_steps: int = Field(0, description="cross-entropy steps on a copy of the teacher first "
                                          "(Minitron's teacher correction); 0: off")
    teacher_correction_lr: float | None = Field(None, description="peak rate of the correction; null: lr")
    checkpoint_every: int = Field(50, description="optimizer steps between resumable checkpoints; 0: never")
    seed: int | None = Field(None, description="data order and training seed; null: the recipe's seed")

    @model_validator(mode="after")
    def _check(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps and tokens")
        if (self.steps is not None and self.steps < 1) or (self.tokens is not None and self.tokens < 1):
            raise ValueError("steps and tokens must be positive")
        if self.teacher is not None and self.teachers is not None:
            raise ValueError("give teacher or teachers, not both")
        if self.teachers is not None and len(self.teachers) == 0:
            raise ValueError("teachers must name at least one model")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        weights = [w for w in (self.kl_weight, self.ce_weight, self.hidden_weight, self.embedding_weight,
                               self.similarity_weight) if w is not None]
        if min(weights) < 0:
            raise ValueError("loss weights must be non-negative")
        if self.kl_weight is not None and sum(weights) == 0:  # (a default kl_weight is 1 where it applies)
            raise ValueError("at least one of kl_weight, ce_weight, hidden_weight, embedding_weight and "
                             "similarity_weight must be positive")
        if self.similarity_weight > 0 and self.batch_size < 2:
            raise ValueError("similarity_weight compares the texts of a micro-batch with each other: "
                             "batch_size must be at least 2")
        if self.texts == "pairs" and self.batch_size % 2:
            raise ValueError(f"texts = 'pairs' puts whole (query, passage) pairs in each micro-batch: batch_size "
                             f"must be even, not {self.batch_size}")
        if self.queries != "first" and self.texts != "pairs":
            raise ValueError(f"queries chooses the query sentences of texts = 'pairs', and texts is {self.texts!r}")
        if self.generated_only and not self.generated_windows:
            raise ValueError("generated_only trains on the windows the teacher writes: give generated_windows too")
        if self.hidden_weight > 0 and not self.layer_map and self.student_layers is None:
            raise ValueError("hidden_weight needs a layer_map, e.g. {'0': 0, '1': 2} (or student_layers)")
        if self.hidden_weight > 0 and self.teachers is not None and len(self.teachers) > 1:
            raise ValueError("the hidden-state loss needs a single teacher")
        if self.layer_map:
            for key, value in self.layer_map.items():
                if not key.isdigit() or value < 0:
                    raise ValueError(f"layer_map entries pair layer indices: {key!r}: {value!r}")
        if isinstance(self.student_layers, list) and (
                not self.student_layers or min(self.student_layers) < 0
                or len(set(self.student_layers)) != len(self.student_layers)):
            raise ValueError("student_layers lists distinct layer indices (at least one), e.g. [0, 2, 5], "
                             "or is 'spread'")
        if not 0 < self.mlm_probability < 1:
            raise ValueError("mlm_probability must lie strictly between 0 and 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must lie in [0, 1]")
        if self.teacher_correction_steps < 0:
            raise ValueError(f"teacher_correction_steps must be 0 (off) or positive, "
                             f"not {self.teacher_correction_steps}")
        if self.teacher_correction_lr is not None and self.teacher_correction_lr <= 0:
            raise ValueError("teacher_correction_lr must be positive (or None: the student's lr)")
        if self.teacher_correction_steps > 0 and self.kl_weight == 0 and self.hidden_weight == 0:
            raise ValueError("teacher_correction_steps > 0 corrects the teacher, but no teacher is used "
                             "(kl_weight and hidden_weight are 0)")
        return self


class QATOptions(Options):
    """Options of ``qat``."""

    epochs: int = Field(2, description="block phase: passes over the calibration windows per layer "
                        "(EfficientQAT's Block-AP: 2); 0 skips the block phase")
    lr: float = Field(1e-4, description="block phase: peak AdamW rate of the scales (EfficientQAT's rate for "
                      "quantization parameters), cosine decay to zero")
    batch_size: int = Field(2, description="block phase: calibration windows per optimizer step (EfficientQAT: 2)")
    targets: list[str] = Field(["*"], description="module-name patterns of the quantized linears whose scales "
                               "train; a quantized token embedding (\"embed\", its name or its tied head's; "
                               "\"*\" too) trains in the end-to-end phase")
    ignore: list[str] = Field([], description="module-name patterns left as they are (\"embed\" or a tied "
                              "head's name: the quantized embedding keeps its scales)")
    e2e_steps: int = Field(0, description="end-to-end phase: optimizer steps of distillation from the original "
                           "model, training only the scales (EfficientQAT's E2E-QP); 0: off")
    e2e_lr: float = Field(2e-5, description="end-to-end phase: peak rate (EfficientQAT's E2E-QP rate)")
    e2e_batch_size: int = Field(1, description="end-to-end phase: windows per optimizer step")
    e2e_generated_windows: int = Field(0, ge=0, description="end-to-end phase: this many more windows "
                                       "that the original model writes itself (distill's generated_windows, "
                                       "LLM-QAT's data-free data); 0: none")
    e2e_generated_only: bool = Field(False, description="end-to-end phase: train on the generated windows "
                                     "alone (distill's generated_only)")
    e2e_average_last: float = Field(0.0, ge=0, lt=1, description="end-to-end phase: the scales end as the mean "
                                    "of their values after each of the last e2e_average_last share of the "
                                    "steps (distill's average_last); 0: the last step's values")
    e2e_mixed_precision: Literal["no", "bf16", "auto"] = Field("no", description="end-to-end phase: bf16 runs "
                                                               "its forward passes in bfloat16 under torch.autocast, "
                                                               "the scales and optimizer state float32; auto: bf16 "
                                                               "where the device multiplies bfloat16 natively "
                                                               "(distill's mixed_precision); no: float32")
    e2e_ce_weight: float = Field(0.0, description="end-to-end phase: weight of next-token cross-entropy "
                                 "next to the KL to the original model's logits")
    text: str | None = Field(None, description="end-to-end phase: training text file (a relative path is taken "
                             "from the recipe's folder); null: the recipe's calibration text")
    seq_len: int | None = Field(None, description="end-to-end phase: tokens per window; null: the calibration seq_len")
    checkpoint_every: int = Field(50, description="end-to-end phase: optimizer steps between resumable "
                                  "checkpoints (the block phase saves after every layer); 0: never")
    seed: int | None = Field(None, description="micro-batch order and training seed; null: the recipe's seed")

    @model_validator(mode="after")
    def _check(self):
        if self.epochs < 0 or self.e2e_steps < 0:
            raise ValueError("epochs and e2e_steps must be 0 (off) or positive")
        if self.epochs == 0 and self.e2e_steps == 0:
            raise ValueError("epochs = 0 and e2e_steps = 0 train nothing: give epochs (block phase) "
                             "or e2e_steps (end-to-end phase)")
        if self.lr <= 0 or self.e2e_lr <= 0:
            raise ValueError("lr and e2e_lr must be positive")
        if self.batch_size < 1 or self.e2e_batch_size < 1:
            raise ValueError("batch_size and e2e_batch_size must be at least 1")
        if self.e2e_ce_weight < 0:
            raise ValueError("e2e_ce_weight must be non-negative")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be 0 (never) or positive")
        if (self.e2e_generated_windows or self.e2e_generated_only) and not self.e2e_steps:
            raise ValueError("e2e_generated_windows and e2e_generated_only shape the end-to-end phase's data: "
                             "give e2e_steps too")
        if self.e2e_generated_only and not self.e2e_generated_windows:
            raise ValueError("e2e_generated_only trains on the windows the original model writes: "
                             "give e2e_generated_windows too")
        return self


def removed_fraction(spec: str | list[int] | None) -> float:
    """The share of layers ``student_layers`` removes, estimated from the option alone (a list is
    taken to end at the teacher's last layer, as DistilBERT's choice does)."""
    if spec is None:
        return 0.0
    if spec == "spread":
        return 0.5
    return max(0.0, 1 - len(spec) / (max(spec) + 1))


def effect(options: DistillOptions) -> SizeEffect:
    """No change in size, unless ``student_layers`` keeps only some layers: a restructured model
    (the share removed is estimated from the option alone, see :func:`removed_fraction`)."""
    if options.student_layers is None:
        return SizeEffect()
    return SizeEffect(params_removed=removed_fraction(options.student_layers), features=frozenset({"restructured"}))


def recovery_effect(options: QATOptions) -> SizeEffect:
    """No change in size. The planner's prior of the loss won back is what the reference model
    measured (README, Benchmark): the block phase took retention from 0.806 to 0.829 (12% of the
    loss); 64 end-to-end steps at e2e_lr 1e-4 with the embedding's scales trained, to 0.922 on
    WikiText-2 (60%) and 0.847 on a text no stage saw (31%): the prior is the lower share."""
    return SizeEffect(recovers=0.32 if options.e2e_steps else 0.12)


def recovery_plan(budget=None) -> list[dict]:
    """What the planner may try for ``qat``, after whichever quantizer the candidate holds (the
    size does not change): the end-to-end phase alone, 64 steps at e2e_lr 1e-4, the setting that
    recovered most on the reference model, at 32,768 tokens against the block phase's 983,040."""
    return [{"epochs": 0, "e2e_steps": 64, "e2e_lr": 1e-4}]
