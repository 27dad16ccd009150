"""``distill`` on encoders (BERT family): sentence-embedding and masked-LM distillation on tiny
random BERT, BERT-MLM and DistilBERT models, and a student made of half the teacher's layers."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from pydantic import ValidationError

from pocketlm import LoadedModel, PocketError, data
from pocketlm.modules import decoder_layers, select_linears
from pocketlm.plugins import get_plugins
from pocketlm.sentence import embed, pooling
from pocketlm.testing import make_context
from pocketlm.testing.models import save_tiny_model, tiny_model, tiny_tokenizer
from pocketlm.weights import linear_weight, masks, set_mask
from pocketlm_distill import DistillOptions, distill
from pocketlm_distill.distill import (
    STATE_FILE,
    Losses,
    Student,
    Trainer,
    encoder_losses,
    make_student_layers,
    pair_order,
)
from pocketlm_distill.encoder import (
    IGNORE,
    Collate,
    Examples,
    Masking,
    embedding_loss,
    length_groups,
    query_passage_pairs,
    similarity_loss,
    similarity_matrix,
    spread_half,
    text_chunks,
    token_loss,
    tokenize_pairs,
)

SEQ_LEN = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A training text file and held-out sentences (other text) with the encoder tokenizer."""
    text = data.read_text(data.resolve_text("builtin:wikitext-2-valid"))
    train = tmp_path_factory.mktemp("corpus") / "train.txt"
    train.write_text(text[:40_000], encoding="utf-8")
    held = text_chunks(text[300_000:330_000], seed=5)[:48]
    return {"tokenizer": tiny_tokenizer(encoder=True), "train": train, "held": held}


def teacher_of(family: str, corpus, seed: int = 0):
    model = tiny_model(family, layers=4, vocab_size=len(corpus["tokenizer"]), seed=seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def options(corpus, **kwargs) -> DistillOptions:
    defaults = dict(text=str(corpus["train"]), seq_len=SEQ_LEN, batch_size=8, lr=2e-3, checkpoint_every=0)
    return DistillOptions(**{**defaults, **kwargs})


def context(corpus, teacher, tmp_path):
    return make_context(None, tokenizer=corpus["tokenizer"], teacher=teacher, stage_dir=tmp_path / "stage")


def mean_cosine(student, teacher, corpus) -> float:
    a = embed(student, corpus["tokenizer"], corpus["held"], max_length=SEQ_LEN)
    b = embed(teacher, corpus["tokenizer"], corpus["held"], max_length=SEQ_LEN)
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def curve(tmp_path) -> list[dict]:
    return list(csv.DictReader(open(tmp_path / "stage" / "loss.csv")))


# ------------------------------------------------------------------------------ pieces


def test_chunks_are_sentences_and_passages_reproducibly():
    text = "= Title =\n\nOne two three. Four five six! Seven eight nine? Ten eleven twelve.\n\n Alpha beta gamma delta.\n"
    chunks = text_chunks(text, seed=1)
    assert chunks == text_chunks(text, seed=1)
    assert all("Title" not in c for c in chunks)
    assert " ".join(chunks) == "One two three. Four five six! Seven eight nine? Ten eleven twelve. Alpha beta gamma delta."
    long_text = "\n".join("First one here. Second one here. Third one here. Fourth one here." for _ in range(30))
    counts = {len(c.split(". ")) for c in text_chunks(long_text, seed=0)}
    assert len(counts) > 1  # single sentences and passages of several


PAIRS_TEXT = ("= Title =\n\nFirst sentence here. Second one follows. Third ends it.\n"
              "Only two sentences. Not a pair.\n"
              "Short. Then a longer second sentence. And a third one too.\n"
              " = = Section = = \n"
              "Another opening line! Is this the second? Yes, \"quoted\" third. Fourth here.\n")


def test_pairs_are_a_paragraphs_first_sentence_and_the_rest():
    """As the retrieval evaluator builds them: paragraphs of 3 sentences or more, headings and
    fragments (a query shorter than 16 characters) left out."""
    assert query_passage_pairs(PAIRS_TEXT) == [
        ("First sentence here.", "Second one follows. Third ends it."),
        ("Another opening line!", 'Is this the second? Yes, "quoted" third. Fourth here.'),
    ]
    tokenizer = tiny_tokenizer(encoder=True)
    ids = tokenize_pairs(tokenizer, query_passage_pairs(PAIRS_TEXT), max_length=12)
    assert [tokenizer.decode(i) for i in ids] == [  # query, its passage, query, its passage; truncated
        "[CLS]First sent[SEP]", "[CLS]Second one[SEP]", "[CLS]Another op[SEP]", "[CLS]Is this th[SEP]"]
    empty = tokenize_pairs(tokenizer, [("A query that is long.", ""), ("Kept query here.", "Kept passage.")], 40)
    assert [tokenizer.decode(i) for i in empty] == ["[CLS]Kept query here.[SEP]", "[CLS]Kept passage.[SEP]"]


def test_every_sentence_of_a_paragraph_can_be_a_query():
    """queries = "every": each sentence of a pair-making paragraph in turn against the others,
    in the text's order; a sentence shorter than 16 characters ("Short.", "Third ends it.") is no
    query, though it stays in the passages of the others."""
    assert query_passage_pairs(PAIRS_TEXT, every_sentence=True) == [
        ("First sentence here.", "Second one follows. Third ends it."),
        ("Second one follows.", "First sentence here. Third ends it."),
        ("Then a longer second sentence.", "Short. And a third one too."),
        ("And a third one too.", "Short. Then a longer second sentence."),
        ("Another opening line!", 'Is this the second? Yes, "quoted" third. Fourth here.'),
        ("Is this the second?", 'Another opening line! Yes, "quoted" third. Fourth here.'),
        ('Yes, "quoted" third.', "Another opening line! Is this the second? Fourth here."),
    ]
    assert DistillOptions(steps=1, texts="pairs", queries="every").queries == "every"
    assert DistillOptions(steps=1).queries == "first"
    with pytest.raises(ValidationError, match="queries chooses the query sentences of texts = 'pairs'"):
        DistillOptions(steps=1, queries="every")
    with pytest.raises(ValidationError):
        DistillOptions(steps=1, texts="pairs", queries="last")


def test_pair_order_keeps_pairs_whole_in_a_seeded_order():
    order = pair_order(n_pairs=5, batch_size=4, count=6, seed=3)
    assert order == pair_order(5, 4, 6, 3) and order != pair_order(5, 4, 6, 4)
    assert all(len(batch) == 4 for batch in order)
    for batch in order:
        for query, passage in zip(batch[0::2], batch[1::2]):
            assert query % 2 == 0 and passage == query + 1  # a query, then its own passage
    firsts = [i // 2 for batch in order for i in batch[0::2]]
    assert sorted(firsts[:5]) == list(range(5))  # an epoch is a permutation of the pairs
    with pytest.raises(ValidationError, match="batch_size must be even"):
        DistillOptions(steps=1, texts="pairs", batch_size=5)
    with pytest.raises(ValidationError):
        DistillOptions(steps=1, texts="sentences")
    assert DistillOptions(steps=1).texts == "chunks"


def test_the_loader_gives_each_query_beside_its_passage(corpus, tmp_path):
    teacher = teacher_of("bert", corpus)
    tokenizer = corpus["tokenizer"]
    trainer = Trainer(copy.deepcopy(teacher), options(corpus, steps=3, grad_accum=2, texts="pairs",
                                                      similarity_weight=1.0), context(corpus, teacher, tmp_path))
    trainer.prepare()
    pairs = {query: passage for query, passage in query_passage_pairs(corpus["train"].read_text(encoding="utf-8"))}
    truncated = {tokenizer.decode(tokenizer(q, truncation=True, max_length=SEQ_LEN)["input_ids"],
                                  skip_special_tokens=True): q for q in pairs}
    seen = []
    for _ in range(6):  # 3 steps of 2 micro-batches
        batch = next(trainer.batches)
        texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        assert len(texts) == 8
        for query, passage in zip(texts[0::2], texts[1::2]):
            assert pairs[truncated[query]].startswith(passage)  # the passage (truncated) of that very query
            seen.append(query)
    assert len(set(seen)) == len(seen) == 24  # 24 different pairs of the first epoch
    assert trainer.n_examples == 2 * len(pairs)


def test_chunks_are_unchanged_by_the_texts_option(corpus):
    """texts = "chunks" (the default) trains on exactly the batches of the versions before the
    option, and keeps their fingerprint, so their checkpoints resume: values recorded then."""
    import hashlib

    from pocketlm_distill.distill import _fingerprint

    batches = {"bert": "7b6ac16c3310c4ccc95ab382cb19500e642da465384862da47e4154cf009ca9e",
               "bert-mlm": "2ccdff768a5451e05b77133f46bdf592fa87444dec2b43f38926f52b53440610"}
    for family, expected in batches.items():
        model = teacher_of(family, corpus)
        for texts in ({}, {"texts": "chunks"}):
            trainer = Trainer(model, options(corpus, steps=6, grad_accum=2, **texts),
                              make_context(None, tokenizer=corpus["tokenizer"], teacher=model))
            trainer.prepare()
            digest = hashlib.sha256()
            for _ in range(12):
                batch = next(trainer.batches)
                for key in sorted(batch):
                    digest.update(key.encode())
                    digest.update(batch[key].numpy().tobytes())
            assert digest.hexdigest() == expected, (family, texts)
    model = teacher_of("bert-mlm", corpus)
    fixed = dict(text="train.txt", seq_len=48, batch_size=8, lr=2e-3, checkpoint_every=0, steps=6, grad_accum=2)
    for texts in ({}, {"texts": "chunks"}):
        assert _fingerprint(DistillOptions(**fixed, **texts), model, 152, 0) == \
            "c957f21c5e5be3c528d15a44461d22581fd21e6b74848cdca57e240544d2e44f"
        assert _fingerprint(DistillOptions(**fixed, similarity_weight=1.0, **texts), model, 152, 0) == \
            "7fdf77004430e1cef8ed7f06b0f74aab71bd2f4df116c678691f9c07a85c8301"
    assert _fingerprint(DistillOptions(**fixed, texts="pairs"), model, 152, 0) != \
        "c957f21c5e5be3c528d15a44461d22581fd21e6b74848cdca57e240544d2e44f"  # pairs: another run
    first = _fingerprint(DistillOptions(**fixed, texts="pairs"), model, 152, 0)
    assert _fingerprint(DistillOptions(**fixed, texts="pairs", queries="first"), model, 152, 0) == first
    assert _fingerprint(DistillOptions(**fixed, texts="pairs", queries="every"), model, 152, 0) != first


def test_bert_masking_and_padding():
    masking = Masking(0.15, mask_id=4, vocab=256, special_ids=frozenset({0, 2, 3}))
    chunks = [[2] + list(range(10, 210)) + [3], [2, 50, 51, 3]]
    examples = Examples(chunks, order=[0, 1, 0], seed=0, masking=masking)
    ids, labels = examples[0]
    predicted = [i for i, label in enumerate(labels) if label != IGNORE]
    assert 15 <= len(predicted) <= 50 and 0 not in predicted and len(ids) - 1 not in predicted  # ~15% of 200
    assert all(labels[i] == chunks[0][i] for i in predicted)
    assert sum(ids[i] == 4 for i in predicted) > 0.6 * len(predicted)  # 80% become [MASK]
    assert all(ids[i] == chunks[0][i] for i in range(len(ids)) if i not in predicted)
    assert examples[0] == examples[0] and examples[0] != examples[2]  # drawn from (seed, position)
    assert any(label != IGNORE for label in examples[1][1])  # at least one predicted token
    batch = Collate(pad_id=0)([examples[0], examples[1]])
    assert batch["input_ids"].shape == (2, 202) and batch["attention_mask"][1].sum() == 4
    assert (batch["labels"][1, 4:] == IGNORE).all() and (batch["input_ids"][1, 4:] == 0).all()


def test_length_groups_cut_a_batch_into_rows_of_similar_length():
    lengths = torch.tensor([5, 30, 7, 31, 6, 29])
    assert [g.tolist() for g in length_groups(lengths, 2)] == [[0, 4, 2], [5, 1, 3]]
    assert [g.tolist() for g in length_groups(lengths, 4)] == [[0, 4], [2, 5], [1], [3]]
    assert [g.tolist() for g in length_groups(lengths, 1)] == [[0, 4, 2, 5, 1, 3]]
    assert [g.tolist() for g in length_groups(lengths[:2], 4)] == [[0], [1]]  # never an empty group


def test_a_micro_batch_in_length_groups_has_the_losses_of_one_forward_pass(corpus):
    """Queries and passages run as forward passes padded to their own group's longest, and every
    term (masked-LM KL and cross-entropy, per-token hidden states, pooled embeddings and their
    similarities) and every gradient is the one of the whole batch in one padded pass."""
    tokenizer = corpus["tokenizer"]
    text = corpus["train"].read_text(encoding="utf-8")
    examples = Examples(tokenize_pairs(tokenizer, query_passage_pairs(text)[:4], 512), order=list(range(8)),
                        seed=0, masking=Masking(0.15, tokenizer.mask_token_id, len(tokenizer),
                                                frozenset(tokenizer.all_special_ids)))
    batch = Collate(tokenizer.pad_token_id)([examples[i] for i in range(8)])
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0::2].max() < lengths[1::2].max() == batch["input_ids"].shape[1]  # queries are shorter
    teacher = teacher_of("bert-mlm", corpus).eval()
    student = Student(teacher_of("bert-mlm", corpus, seed=3), {0: 1, 1: 3}, torch.nn.ModuleDict(), "cosine",
                      states=True).eval()  # no dropout: the passes must agree
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    losses = Losses("masked-lm", kl=1.0, ce=0.5, hidden=1.0, embedding=1.0, hidden_loss="cosine", similarity=2.0)
    poolings = [pooling(student.model), pooling(teacher)]
    widths = []
    teacher.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                      with_kwargs=True)

    def terms_and_grads(groups):
        student.zero_grad()
        terms = encoder_losses(student, [teacher], batch, losses, {0: 1, 1: 3}, options(corpus, steps=1, texts="pairs"),
                               poolings, groups=groups)
        terms[0].backward()
        return terms.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    whole, whole_grads = terms_and_grads(1)
    assert widths == [batch["input_ids"].shape[1]]
    grouped, grouped_grads = terms_and_grads(4)
    assert widths[1:] == [int(lengths[rows].max()) for rows in length_groups(lengths, 4)]
    assert sum(widths[1:]) < 3 * widths[0]  # four passes cost less than four of the whole batch's width
    assert (whole[1:] > 0).all()  # every term is computed
    assert torch.allclose(whole, grouped, rtol=1e-5, atol=1e-6), (whole, grouped)
    assert whole_grads.keys() == grouped_grads.keys()
    for name, grad in whole_grads.items():
        assert torch.allclose(grad, grouped_grads[name], rtol=1e-4, atol=1e-6), name


def test_losses_match_definitions():
    torch.manual_seed(0)
    s, t, u = torch.randn(5, 16), torch.randn(5, 16), torch.randn(5, 16)
    assert torch.isclose(embedding_loss(s, [t], "cosine"), 1 - F.cosine_similarity(s, t).mean())
    assert torch.isclose(embedding_loss(s, [t, u], "mse"), F.mse_loss(s, (t + u) / 2))  # averaged teacher
    assert embedding_loss(t, [t], "cosine").abs() < 1e-6
    hs, ht = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    keep = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per_token = 1 - F.cosine_similarity(hs, ht, dim=-1)
    expected = (per_token[0, 0] + per_token[0, 1] + per_token[1, 0]) / 3  # padding ignored
    assert torch.isclose(token_loss(hs, ht, keep, "cosine"), expected)
    assert torch.isclose(token_loss(hs, ht, None, "mse"), F.mse_loss(hs, ht))


def test_similarity_loss_compares_how_texts_relate():
    torch.manual_seed(0)
    s, t, u = torch.randn(6, 16), torch.randn(6, 16), torch.randn(6, 16)
    scale = torch.rand(6, 1) * 5 + 0.1
    assert similarity_loss(t * scale, [t]) < 1e-10  # cosine: a positive scale per text changes nothing
    flipped = t.clone()
    flipped[2] *= -1
    assert similarity_loss(flipped, [t]) > 0.05 and similarity_loss(s, [t]) > 0.05
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    differences = (unit(s) @ unit(s).T - unit(t) @ unit(t).T).pow(2)
    pairs = differences.sum() - differences.diagonal().sum()
    assert torch.isclose(similarity_loss(s, [t]), pairs / 30)  # 6 * 5 ordered pairs of different texts
    order = torch.randperm(6)
    assert torch.isclose(similarity_loss(s[order], [t[order]]), similarity_loss(s, [t]))
    assert not torch.isclose(similarity_loss(s[order], [t]), similarity_loss(s, [t]))  # pairs must match
    assert torch.isclose(similarity_loss(s, [t, u]), similarity_loss(s, [(t + u) / 2]))  # averaged teacher
    assert similarity_loss(s, [torch.randn(6, 40)]) > 0  # the widths may differ


def test_similarities_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    s = torch.randn(8, 64)
    t = s + 0.05 * torch.randn(8, 64)  # cosines a few hundredths from the student's
    exact = similarity_loss(s, [t])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert similarity_matrix(s).dtype == torch.float32
        assert torch.equal(similarity_loss(s, [t]), exact)
        unit = F.normalize(s, dim=-1)
        rounded = unit @ unit.T  # what a bare product gives here: bfloat16, its cosines off by up to 1e-3
        assert rounded.dtype == torch.bfloat16 and (rounded.float() - similarity_matrix(s)).abs().max() > 3e-4


def test_similarity_weight_options():
    assert DistillOptions(steps=1, kl_weight=0, similarity_weight=1).similarity_weight == 1
    with pytest.raises(ValidationError, match="similarity_weight"):
        DistillOptions(steps=1, kl_weight=0)  # named among the weights of which one must be positive
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        DistillOptions(steps=1, similarity_weight=-1)
    with pytest.raises(ValidationError, match="batch_size must be at least 2"):
        DistillOptions(steps=1, similarity_weight=1, batch_size=1)


def test_spread_half_is_distilberts_choice():
    assert spread_half(12) == [0, 2, 4, 7, 9, 11]  # the layers DistilBERT kept of BERT-base
    assert spread_half(6) == [0, 2, 5] and spread_half(4) == [0, 3] and spread_half(3) == [0, 2]


# ------------------------------------------------------------------------------ student from the teacher


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_student_layers_copy_the_chosen_teacher_layers_exactly(family, corpus, tmp_path):
    teacher = teacher_of(family, corpus)
    student = copy.deepcopy(teacher)
    ctx = context(corpus, teacher, tmp_path)
    arch = ctx.architecture(student)
    kept = make_student_layers(student, teacher, options(corpus, steps=1, student_layers="spread"), ctx)
    assert kept == [0, 3]
    student_layers, teacher_layers = decoder_layers(student, arch), decoder_layers(teacher, arch)
    assert len(student_layers) == 2 and getattr(student.config, arch.layer_count_key) == 2
    for index, chosen in enumerate(kept):
        ours, theirs = student_layers[index].state_dict(), teacher_layers[chosen].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert len(decoder_layers(teacher, arch)) == 4  # the teacher keeps its layers


def test_size_effect_declares_restructured():
    method = get_plugins().methods["distill"]
    plain = method.effect(DistillOptions(steps=1))
    assert plain.params_removed == 0.0 and "restructured" not in plain.features
    halved = method.effect(DistillOptions(steps=1, student_layers="spread"))
    assert halved.params_removed == 0.5 and "restructured" in halved.features
    listed = method.effect(DistillOptions(steps=1, student_layers=[0, 2, 5]))
    assert listed.params_removed == 0.5 and "restructured" in listed.features


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("family,precision", [("bert", "no"), ("distilbert", "no"), ("bert", "bf16")])
def test_sentence_embeddings_move_toward_the_teacher(family, precision, corpus, tmp_path):
    teacher = teacher_of(family, corpus)
    student = copy.deepcopy(teacher)
    make_student_layers(student, teacher, options(corpus, steps=1, student_layers="spread"),
                        context(corpus, teacher, tmp_path))
    before = mean_cosine(student, teacher, corpus)
    student = copy.deepcopy(teacher)  # distill makes the same student itself
    messages = []
    ctx = context(corpus, teacher, tmp_path)
    ctx.logger = messages.append
    distill(student, options(corpus, steps=25, student_layers="spread", hidden_weight=0.5, mixed_precision=precision),
            ctx)
    after = mean_cosine(student, teacher, corpus)
    assert any("sentence encoder" in m and "losses: hidden 0.5, embedding 1" in m for m in messages), messages
    rows = curve(tmp_path)
    first, last = rows[:3], rows[-3:]
    mean = lambda rows, key: sum(float(r[key]) for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "embedding") < 0.5 * mean(first, "embedding"), (first, last)
    assert mean(last, "hidden") < mean(first, "hidden")
    assert all(float(r["kl"]) == 0 and float(r["ce"]) == 0 for r in rows)
    # on sentences it never saw, the gap to the teacher (1 - cos) at least halves
    assert 1 - after < 0.5 * (1 - before), (before, after)
    assert len(decoder_layers(student, ctx.architecture(student))) == 2


def similarity_gap(student, teacher, corpus) -> float:
    """Mean squared difference of the student's and the teacher's cosine similarities between
    different held-out texts."""
    a = embed(student, corpus["tokenizer"], corpus["held"], max_length=SEQ_LEN)
    b = embed(teacher, corpus["tokenizer"], corpus["held"], max_length=SEQ_LEN)
    return similarity_loss(a, [b]).item()


def test_similarity_loss_brings_the_similarity_matrix_closer(corpus, tmp_path):
    """The same steps from the same half-depth student, with and without similarity_weight: with
    it, how held-out texts relate to each other is clearly closer to how they relate in the teacher."""
    teacher = teacher_of("bert", corpus)
    # A random BERT embeds every text almost alike (pairwise cosine 0.99): its token-type and
    # position embeddings, the same for every text, dominate the mean. Without them its texts
    # are distinct (cosine 0.88 +- 0.05), so there are relations to learn, as in a trained encoder.
    with torch.no_grad():
        teacher.embeddings.token_type_embeddings.weight.zero_()
        teacher.embeddings.position_embeddings.weight.mul_(0.1)
    gaps = {}
    for weight in (0.0, 4.0):
        student = copy.deepcopy(teacher)
        messages = []
        ctx = context(corpus, teacher, tmp_path / str(weight))
        ctx.logger = messages.append
        distill(student, options(corpus, steps=25, student_layers="spread", similarity_weight=weight), ctx)
        gaps[weight] = similarity_gap(student, teacher, corpus)
        rows = curve(tmp_path / str(weight))
        if weight:
            assert any("losses: embedding 1, similarity 4" in m for m in messages), messages
            assert float(rows[-1]["similarity"]) < float(rows[0]["similarity"])
        else:
            assert all(float(r["similarity"]) == 0 for r in rows)
    print("similarity gap after 25 steps without / with similarity_weight 4:", gaps)
    assert gaps[4.0] < 0.5 * gaps[0.0], gaps


def query_passage_gap(student, teacher, held: list[tuple[str, str]], max_length: int) -> float:
    """Mean squared difference of the student's and the teacher's cosine similarities of every
    held-out query with every held-out passage (what retrieval ranks by)."""
    tokenizer = tiny_tokenizer(encoder=True)

    def matrix(model):
        queries = F.normalize(embed(model, tokenizer, [q for q, _ in held], max_length=max_length), dim=-1)
        passages = F.normalize(embed(model, tokenizer, [p for _, p in held], max_length=max_length), dim=-1)
        return queries @ passages.T

    return (matrix(student) - matrix(teacher)).pow(2).mean().item()


def test_pairs_with_the_similarity_loss_bring_query_passage_similarities_closer(corpus, tmp_path):
    """texts = "pairs": with similarity_weight, how held-out queries relate to held-out passages
    is several times closer to the teacher's than without it. (Against texts = "chunks" with the
    same weight the tiny random teacher shows no reliable difference: printed, not asserted.)"""
    teacher = teacher_of("bert", corpus)
    with torch.no_grad():  # distinct texts, as in test_similarity_loss_brings_the_similarity_matrix_closer
        teacher.embeddings.token_type_embeddings.weight.zero_()
        teacher.embeddings.position_embeddings.weight.mul_(0.1)
    text = data.read_text(data.resolve_text("builtin:wikitext-2-valid"))
    train = tmp_path / "train.txt"
    train.write_text(text[:120_000], encoding="utf-8")
    held = query_passage_pairs(text[300_000:360_000])[:48]  # other paragraphs than the training text's
    length = 128  # bytes of the test tokenizer: a query and the start of its passage
    gaps = {}
    for texts, weight in (("pairs", 0.0), ("pairs", 4.0), ("chunks", 4.0)):
        student = copy.deepcopy(teacher)
        folder = tmp_path / f"{texts}-{weight}"
        distill(student, options(corpus, text=str(train), seq_len=length, steps=25, student_layers="spread",
                                 similarity_weight=weight, texts=texts), context(corpus, teacher, folder))
        gaps[texts, weight] = query_passage_gap(student, teacher, held, length)
        if weight:
            rows = curve(folder)
            assert float(rows[-1]["similarity"]) < float(rows[0]["similarity"])
    print("held-out query x passage similarity error after 25 steps:", gaps)
    assert gaps["pairs", 4.0] < 0.5 * gaps["pairs", 0.0], gaps


@pytest.mark.parametrize("family", ["bert-mlm", "distilbert-mlm"])
def test_masked_lm_distillation_lowers_the_masked_kl(family, corpus, tmp_path):
    teacher = teacher_of(family, corpus)
    student = teacher_of(family, corpus, seed=1)  # another random model: far from the teacher
    tokenizer = corpus["tokenizer"]
    masking = Masking(0.15, tokenizer.mask_token_id, len(tokenizer), frozenset(tokenizer.all_special_ids))
    held_ids = tokenizer(corpus["held"], truncation=True, max_length=SEQ_LEN)["input_ids"]
    held = Collate(0)([Examples(held_ids, list(range(len(held_ids))), 9, masking)[i] for i in range(len(held_ids))])

    @torch.no_grad()
    def masked_kl(model) -> float:
        inputs = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
        where = held["labels"] != IGNORE
        p = F.log_softmax(teacher(**inputs).logits[where], -1)
        q = F.log_softmax(model(**inputs).logits[where], -1)
        return F.kl_div(q, p, log_target=True, reduction="batchmean").item()

    before = masked_kl(student)
    distill(student, options(corpus, steps=25, hidden_weight=0.5, layer_map={"0": 1, "3": 3}),
            context(corpus, teacher, tmp_path))
    after = masked_kl(student)
    assert after < 0.6 * before, (before, after)
    rows = curve(tmp_path)
    for key in ("kl", "hidden"):
        assert float(rows[-1][key]) < float(rows[0][key]), key
    assert all(float(r["embedding"]) == 0 and float(r["ce"]) == 0 for r in rows)


@pytest.mark.parametrize("texts", ["chunks", "pairs"])
def test_multi_teacher_embeddings_are_averaged(texts, corpus, tmp_path):
    first, second = teacher_of("bert", corpus, seed=0), teacher_of("bert", corpus, seed=2)
    loaded = {"a": first, "b": second}
    student = teacher_of("bert", corpus, seed=3)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    ctx = context(corpus, None, tmp_path)
    ctx.model_loader = lambda source: LoadedModel(loaded[source], corpus["tokenizer"], source)
    tokenizer, held = corpus["tokenizer"], corpus["held"]
    target = (embed(first, tokenizer, held, max_length=SEQ_LEN) + embed(second, tokenizer, held, max_length=SEQ_LEN)) / 2

    def to_target() -> float:
        return F.cosine_similarity(embed(student, tokenizer, held, max_length=SEQ_LEN), target, dim=-1).mean().item()

    before = to_target()
    distill(student, options(corpus, steps=20, teachers=["a", "b"], texts=texts), ctx)
    after = to_target()
    assert 1 - after < 0.5 * (1 - before), (before, after)


def killed_then_resumed(start, opts, corpus, teacher, folder):
    """``distill`` from a copy of ``start``, killed after its step-2 checkpoint, then run again
    in the same folder: the resumed model."""
    from test_distill import _Killed, _KillAfter

    ctx = context(corpus, teacher, folder)
    ctx.progress = _KillAfter(3)  # the last checkpoint holds step 2
    with pytest.raises(_Killed):
        distill(copy.deepcopy(start), opts, ctx)
    assert torch.load(folder / "stage" / STATE_FILE, weights_only=True)["step"] == 2
    resumed = copy.deepcopy(start)
    distill(resumed, opts, context(corpus, teacher, folder))
    return resumed


def test_a_pruned_encoder_stays_pruned_and_resumes_exactly(corpus, tmp_path):
    teacher = teacher_of("bert-mlm", corpus)
    base = copy.deepcopy(teacher)
    for name, module in select_linears(base, ["*"], ["cls.*"]).items():
        weight = linear_weight(module)
        set_mask(module, weight.abs() > weight.abs().median())
    kept = {name: mask.clone() for name, mask in masks(base).items()}
    opts = options(corpus, steps=6, checkpoint_every=2, batch_size=4, hidden_weight=1.0, layer_map={"0": 0, "1": 2},
                   embedding_weight=1.0, ce_weight=0.5, similarity_weight=1.0)  # every term of a masked-LM encoder
    straight = copy.deepcopy(base)
    distill(straight, opts, context(corpus, teacher, tmp_path / "a"))

    resumed = killed_then_resumed(base, opts, corpus, teacher, tmp_path / "b")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    for name, mask in kept.items():
        weight = linear_weight(straight.get_submodule(name))
        assert torch.equal(masks(straight)[name], mask) and torch.count_nonzero(weight[~mask]) == 0
    moved = (linear_weight(straight.get_submodule(next(iter(kept)))) - linear_weight(base.get_submodule(next(iter(kept)))))
    assert moved.abs().max() > 1e-4  # the kept weights trained


def test_every_sentence_queries_train_on_more_pairs_of_the_same_text(corpus, tmp_path):
    """queries = "every": the trainer reads several times the pairs of queries = "first" from the
    same text, says so, and each query in a batch sits beside the rest of its own paragraph."""
    teacher = teacher_of("bert", corpus)
    tokenizer = corpus["tokenizer"]
    text = corpus["train"].read_text(encoding="utf-8")
    opts = options(corpus, steps=2, texts="pairs", queries="every", similarity_weight=1.0)
    trainer = Trainer(copy.deepcopy(teacher), opts, context(corpus, teacher, tmp_path))
    trainer.prepare()
    every, first = query_passage_pairs(text, every_sentence=True), query_passage_pairs(text)
    assert trainer.n_examples == 2 * len(every) >= 2 * 3 * len(first)
    assert f"encoder on {len(every)} (query, passage) pairs (every sentence a query)" in trainer._describe()
    batch = next(trainer.batches)
    texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)

    def truncated(text: str) -> str:
        return tokenizer.decode(tokenizer(text, truncation=True, max_length=SEQ_LEN)["input_ids"],
                                skip_special_tokens=True)

    known = {(truncated(query), truncated(passage)) for query, passage in every}
    assert all(pair in known for pair in zip(texts[0::2], texts[1::2]))


def test_pairs_resume_exactly_with_masking(corpus, tmp_path):
    """texts = "pairs" on a masked-LM encoder with every term: killed after a checkpoint and
    resumed, it ends with the weights of the uninterrupted run, bit for bit."""
    teacher = teacher_of("bert-mlm", corpus)
    opts = options(corpus, steps=6, checkpoint_every=2, batch_size=4, hidden_weight=1.0, layer_map={"0": 0, "1": 2},
                   embedding_weight=1.0, ce_weight=0.5, similarity_weight=1.0, texts="pairs")
    straight = copy.deepcopy(teacher)
    messages = []
    ctx = context(corpus, teacher, tmp_path / "a")
    ctx.logger = messages.append
    distill(straight, opts, ctx)
    assert any("masked-lm encoder on 47 (query, passage) pairs" in m for m in messages), messages

    resumed = killed_then_resumed(teacher, opts, corpus, teacher, tmp_path / "b")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(straight.state_dict().values(), teacher.state_dict().values()))


# ------------------------------------------------------------------------------ refused


def test_options_that_cannot_apply_are_refused(corpus, tmp_path):
    teacher = teacher_of("bert", corpus)
    with pytest.raises(PocketError) as error:
        distill(copy.deepcopy(teacher), options(corpus, steps=2, kl_weight=1.0), context(corpus, teacher, tmp_path))
    assert error.value.field == "kl_weight" and "bare encoder has none" in str(error.value)
    assert "embedding_weight" in error.value.fix
    with pytest.raises(PocketError, match="ce_weight"):
        distill(copy.deepcopy(teacher), options(corpus, steps=2, ce_weight=1.0), context(corpus, teacher, tmp_path))
    shallow = copy.deepcopy(teacher)
    make_student_layers(shallow, teacher, options(corpus, steps=1, student_layers=[0, 2]), context(corpus, teacher, tmp_path))
    with pytest.raises(PocketError, match="an earlier stage removed layers") as error:
        distill(shallow, options(corpus, steps=2, student_layers="spread"), context(corpus, teacher, tmp_path))
    assert error.value.field == "student_layers" and "layer_map" in error.value.fix
    with pytest.raises(PocketError, match="teacher correction") as error:
        distill(copy.deepcopy(teacher), options(corpus, steps=2, teacher_correction_steps=2, hidden_weight=1.0,
                                                layer_map={"0": 0}), context(corpus, teacher, tmp_path))
    causal = tiny_model("llama", vocab_size=len(corpus["tokenizer"]))
    with pytest.raises(PocketError, match="causal LM makes none"):
        distill(causal, options(corpus, steps=2, embedding_weight=1.0), context(corpus, causal, tmp_path))
    with pytest.raises(PocketError, match="causal LM makes none") as error:
        distill(causal, options(corpus, steps=2, similarity_weight=1.0), context(corpus, causal, tmp_path))
    assert error.value.field == "similarity_weight" and "remove similarity_weight" in error.value.fix
    with pytest.raises(PocketError, match="causal LM trains on token windows") as error:
        distill(causal, options(corpus, steps=2, texts="pairs"), context(corpus, causal, tmp_path))
    assert error.value.field == "texts" and "remove texts" in error.value.fix
    with pytest.raises(PocketError, match=r"holds 2 \(query, passage\) pairs") as error:
        short = tmp_path / "short.txt"
        short.write_text(PAIRS_TEXT, encoding="utf-8")
        distill(copy.deepcopy(teacher), options(corpus, steps=2, texts="pairs", text=str(short)),
                context(corpus, teacher, tmp_path))
    assert error.value.field == "texts"
    with pytest.raises(PocketError, match="an encoder writes none") as error:
        distill(copy.deepcopy(teacher), options(corpus, steps=2, generated_windows=4), context(corpus, teacher, tmp_path))
    assert error.value.field == "generated_windows"
    with pytest.raises(ValidationError, match="mlm_probability"):
        DistillOptions(steps=1, mlm_probability=1.5)
    with pytest.raises(ValidationError, match="student_layers"):
        DistillOptions(steps=1, student_layers=[0, 0])
    with pytest.raises(ValidationError):
        DistillOptions(steps=1, embedding_loss="l1")


# ------------------------------------------------------------------------------ the command line


RECIPE = """[model]
source = "tiny"
[calibration]
samples = 2
seq_len = 48
[[stages]]
method = "distill"
steps = 6
batch_size = 8
lr = 2e-3
student_layers = "spread"
[export]
format = "hf"
"""


def test_recipe_on_a_saved_bert_through_the_cli(tmp_path, monkeypatch):
    from pocketlm.cli import main

    save_tiny_model(tmp_path / "tiny", "bert", layers=4)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE)
    result = CliRunner().invoke(main, ["run", "recipe.toml"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "distill: student made of layers [0, 3] of 4" in output
    assert "sentence encoder on" in output and "losses: embedding 1" in output
    first, last = map(float, output.split("distill: loss ")[1].split(" over")[0].split(" -> "))
    assert last < first
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "runs" / "recipe" / "export").num_hidden_layers == 2


def test_a_relative_training_text_and_teacher_are_the_recipes_folders(tmp_path, monkeypatch):
    """distill's text = "pairs.txt" and teacher = "tiny" beside the recipe are read from there
    whichever folder the run starts in (as [calibration] text and [model] source are); a missing
    text is one error naming the field and the fix."""
    from pocketlm.cli import main

    project = tmp_path / "project"
    save_tiny_model(project / "tiny", "bert", layers=4)
    (project / "pairs.txt").write_text(PAIRS_TEXT * 3, encoding="utf-8")
    recipe = RECIPE.replace('student_layers = "spread"', 'student_layers = "spread"\ntexts = "pairs"\n'
                            'text = "pairs.txt"\nteacher = "tiny"').replace("batch_size = 8", "batch_size = 4")
    (project / "recipe.toml").write_text(recipe)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(main, ["run", str(project / "recipe.toml"), "--run-dir", "run"])
    assert result.exit_code == 0, result.output
    pairs = len(query_passage_pairs(PAIRS_TEXT * 3))
    assert f"sentence encoder on {pairs} (query, passage) pairs" in " ".join(result.output.split())

    (project / "recipe.toml").write_text(recipe.replace("pairs.txt", "missing.txt"))
    result = CliRunner().invoke(main, ["run", str(project / "recipe.toml"), "--run-dir", "run2"])
    output = " ".join(result.output.split())
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"the training text {project / 'missing.txt'} does not exist" in output
    assert "a relative path is taken from the recipe's folder" in output


# ------------------------------------------------------------------------------ 2 processes


def _encoder_rank(rank, port, student, teacher, corpus, opts, stage, out):
    """One of 2 forked processes with the environment ``torchrun``/``accelerate launch --cpu`` sets."""
    import os

    from safetensors.torch import save_file

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # forget the parent's 1-process state
    GradientState._reset_state()
    messages = []
    ctx = make_context(None, tokenizer=corpus["tokenizer"], teacher=teacher, stage_dir=stage)
    ctx.logger = messages.append
    distill(student, opts, ctx)
    if not any("on 2 process(es)" in m for m in messages):
        raise SystemExit(4)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out)


def one_and_two_processes(family, corpus, tmp_path, **extra):
    """Weights before, after 1 process and after 2 gloo CPU processes (DDP through accelerate) of
    the same run on the same global batches."""
    import multiprocessing

    from safetensors.torch import load_file

    from pocketlm.testing import free_port

    teacher = teacher_of(family, corpus)
    student = teacher_of(family, corpus, seed=3)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    # dropout draws differ between ranks as in any data-parallel training; without it the two
    # runs must agree, which checks how batches, masks and losses are sharded
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    opts = options(corpus, **{"steps": 4, "batch_size": 4, "grad_accum": 2, **extra})
    one = copy.deepcopy(student)
    distill(one, opts, context(corpus, teacher, tmp_path / "one"))

    port = free_port()
    out = tmp_path / "two.safetensors"
    fork = multiprocessing.get_context("fork")
    processes = [fork.Process(target=_encoder_rank, args=(rank, port, copy.deepcopy(student), teacher, corpus, opts,
                                                          tmp_path / "two" / "stage", out)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(180)
    assert [p.exitcode for p in processes] == [0, 0]
    return student.state_dict(), one.state_dict(), load_file(str(out))


@pytest.mark.parametrize("family, extra", [
    ("bert", {}), ("bert-mlm", {}), ("bert", {"embedding_weight": 1.0, "similarity_weight": 1.0}),
    ("bert-mlm", {"texts": "pairs", "similarity_weight": 1.0}),  # each process holds a whole pair
    ("bert", {"texts": "pairs", "similarity_weight": 1.0, "batch_size": 2}),  # a query here, its passage there
])
def test_two_processes_match_one_on_an_encoder(family, extra, corpus, tmp_path):
    """The same global batch on 2 processes and on 1 gives the same weights: for the
    sentence-embedding loss; for the masked-LM loss, whose per-token means are weighted by each
    process's share of the batch's masked tokens (the halves of a batch hold different counts);
    and for the similarity loss, whose matrix spans the texts of both processes (gathered); with
    texts = "pairs" too, also where a pair's query and passage fall on different processes."""
    before, one, two = one_and_two_processes(family, corpus, tmp_path, **extra)
    moved_one = moved_two = 0.0
    for name, a in one.items():
        moved_one = max(moved_one, (a - before[name]).abs().max().item())
        moved_two = max(moved_two, (two[name] - before[name]).abs().max().item())
        # float sums in another order (the all-reduce): Adam turns a gradient near zero into a
        # step of up to its rate, so a weight may move by a few 1e-5 either way
        assert torch.allclose(a, two[name], atol=5e-5, rtol=1e-4), (name, (a - two[name]).abs().max())
    assert moved_one > 1e-3 and moved_two > 1e-3  # both runs really trained


def test_two_processes_differ_from_one_without_the_gather(corpus, tmp_path, monkeypatch):
    """The check above can fail: each process's similarity matrix over its own half of the batch
    (no gather) trains other weights than one process does."""
    import sys

    module = sys.modules["pocketlm_distill.distill"]  # (the package's `distill` is the function)
    monkeypatch.setattr(module, "gathered", lambda rows: rows)  # the forked processes inherit it
    _, one, two = one_and_two_processes("bert", corpus, tmp_path, embedding_weight=1.0, similarity_weight=1.0)
    gap = max((a - two[name]).abs().max().item() for name, a in one.items())
    print("largest difference without the gather:", gap)
    assert gap > 1e-3, gap  # twenty times the tolerance above
