"""The encoder evaluators (embedding-fidelity, retrieval, latency for encoders) and the refusal of
next-token metrics on an encoder, on tiny random encoders through a real Context."""

import copy
import random

import pytest
import torch

from pocketlm.builtins.encoder_evaluators import (FidelityOptions, RetrievalOptions, embedding_fidelity,
                                                   evaluation_sentences, is_heading, mrr_at, paragraphs, recall_at,
                                                   retrieval, retrieval_pairs, retrieval_ranks, split_sentences)
from pocketlm.builtins.evaluators import (DivergenceOptions, LatencyOptions, PerplexityOptions, kl_divergence,
                                          latency, perplexity, top1_agreement)
from pocketlm.data import DEFAULT_EVALUATION_TEXT, read_text, resolve_text
from pocketlm.errors import PocketError
from pocketlm.testing import make_context
from pocketlm.testing.models import tiny_model, tiny_tokenizer

FAMILIES = ("bert", "bert-mlm", "roberta", "distilbert")


def encoder(family="bert", seed=0):
    return tiny_model(family, vocab_size=len(tiny_tokenizer(encoder=True)), seed=seed)


def context_for(teacher):
    return make_context(tokenizer=tiny_tokenizer(encoder=True), teacher=teacher)


def zeroed(model):
    """Every matrix (linears and embeddings) zeroed: every text gets the same embedding."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.zero_()
    return model


def noised(model, scale, seed=0):
    """Gaussian noise of ``scale`` times each matrix's own standard deviation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * scale)
    return model


def topic_text(paragraphs_count, *, shuffled=False, seed=0):
    """Paragraphs of four sentences, each paragraph drawn from its own six made-up words, so a
    query shares its words with its own passage only (and a heading every ten paragraphs).
    ``shuffled``: every paragraph keeps its first sentence but gets another one's rest."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    bodies = []
    for _ in range(paragraphs_count):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(4, 8))) for _ in range(6)]
        bodies.append([" ".join(rng.choice(words) for _ in range(7)).capitalize() + " ." for _ in range(4)])
    if shuffled:
        order = list(range(paragraphs_count))
        rng.shuffle(order)
        bodies = [[body[0]] + bodies[other][1:] for body, other in zip(bodies, order)]
    lines = []
    for index, body in enumerate(bodies):
        if index % 10 == 0:
            lines.append(" = Topics = ")
        lines.append(" ".join(body))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- text protocol

def test_sentences_split_at_a_free_standing_period_before_a_capital():
    paragraph = 'He was born in 1970 . He had a role as " Craig " in 2004 ! Was it good ? yes . 3 films followed .'
    assert split_sentences(paragraph) == ["He was born in 1970 .", 'He had a role as " Craig " in 2004 !',
                                          "Was it good ? yes .", "3 films followed ."]
    assert split_sentences("St. Louis is a city .") == ["St.", "Louis is a city ."]  # simple, and the same every time


def test_paragraphs_are_lines_without_headings_or_blanks():
    text = " = Robert Boulter = \n\n Robert Boulter is an actor . \n = = Career = = \n In 2000 he acted . \n"
    assert is_heading(" = = Career = = ") and not is_heading(" In 2000 he acted . ")
    assert paragraphs(text) == ["Robert Boulter is an actor .", "In 2000 he acted ."]


def test_retrieval_pairs_are_first_sentence_and_rest_of_long_paragraphs_in_order():
    text = (" = Title = \n"
            " One two three four . Five six seven . Eight nine ten . \n"
            " Too short here . Only two sentences . \n"
            " = = Section = = \n"
            " Alpha beta gamma . Delta epsilon . Zeta eta . Theta iota . \n"
            " One two three four . A repeated query . Has no second answer . \n")
    pairs = retrieval_pairs(text, 10)
    assert pairs == [("One two three four .", "Five six seven . Eight nine ten ."),
                     ("Alpha beta gamma .", "Delta epsilon . Zeta eta . Theta iota .")]
    assert retrieval_pairs(text, 1) == pairs[:1]


def test_retrieval_pairs_of_the_bundled_text_are_reproducible():
    text = read_text(resolve_text(DEFAULT_EVALUATION_TEXT))
    pairs = retrieval_pairs(text, 500)
    assert len(pairs) == 500 and pairs == retrieval_pairs(text, 500)
    assert pairs[0] == ("Robert Boulter is an English film , television and theatre actor .",
                        pairs[0][1]) and pairs[0][1].startswith("He had a guest @-@ starring role")
    assert not any(q.startswith("=") or p.startswith("=") for q, p in pairs)
    assert len({q for q, _ in pairs}) == len({p for _, p in pairs}) == 500


def test_evaluation_sentences_are_long_enough_and_spread_over_the_text():
    text = read_text(resolve_text(DEFAULT_EVALUATION_TEXT))
    sentences = evaluation_sentences(text, 256)
    assert len(sentences) == 256 and sentences == evaluation_sentences(text, 256)
    assert all(len(s.split()) >= 5 for s in sentences)
    assert sentences[0].startswith("Robert Boulter")
    last_paragraphs = " ".join(paragraphs(text)[-200:])
    assert sentences[-1] in last_paragraphs  # evenly spaced: the last one comes from the end of the text
    short = "Short one . A sentence of five words here ."
    assert evaluation_sentences(short, 10) == ["A sentence of five words here ."]


# --------------------------------------------------------------------------- ranking

def test_ranks_recall_and_mrr_on_hand_made_embeddings():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    passages = torch.tensor([[2.0, 0.1], [1.0, 0.0], [0.9, 1.0], [-1.0, 0.0]])
    # query 1 prefers passage 2 (0.74) over its own (0.0): rank 4, below passage 0's 0.05 and 2's
    assert retrieval_ranks(queries, passages).tolist() == [2, 4, 1, 1]
    ranks = torch.tensor([1, 2, 4, 11])
    assert recall_at(ranks, 1) == 0.25
    assert mrr_at(ranks, 10) == pytest.approx((1 + 1 / 2 + 1 / 4 + 0) / 4)


def test_a_tie_counts_against_the_model():
    same = torch.ones(5, 3)
    assert retrieval_ranks(same, same).tolist() == [5] * 5


# --------------------------------------------------------------------------- embedding-fidelity

def test_embedding_fidelity_is_one_against_itself_and_falls_with_the_perturbation():
    original = encoder()
    context = context_for(original)
    options = FidelityOptions(sentences=48, batch_size=16)
    itself = embedding_fidelity(copy.deepcopy(original), options, context)
    assert itself["embedding_fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert itself["embedding_fidelity_p5"] == pytest.approx(1.0, abs=1e-6)
    assert itself["fidelity_sentences"] == 48
    slight = embedding_fidelity(noised(copy.deepcopy(original), 0.01), options, context)
    heavy = embedding_fidelity(noised(copy.deepcopy(original), 0.5), options, context)
    assert 0.999 < slight["embedding_fidelity"] < 1.0 - 1e-7
    assert heavy["embedding_fidelity"] < 0.97 and heavy["embedding_fidelity"] < slight["embedding_fidelity"]
    assert heavy["embedding_fidelity_p5"] <= heavy["embedding_fidelity"]
    assert all(p.std() > 0 for p in original.parameters() if p.dim() == 2)  # the original was not touched


def test_embedding_fidelity_reads_a_text_file_and_refuses_a_missing_one(tmp_path):
    original = encoder()
    (tmp_path / "text.txt").write_text(topic_text(12))
    result = embedding_fidelity(copy.deepcopy(original), FidelityOptions(text=str(tmp_path / "text.txt")),
                                context_for(original))
    assert result["fidelity_sentences"] == 48  # 12 paragraphs of four sentences, fewer than asked
    with pytest.raises(PocketError, match="does not exist") as caught:
        embedding_fidelity(original, FidelityOptions(text=str(tmp_path / "nothing.txt")), context_for(original))
    assert caught.value.field == "evaluate.embedding-fidelity.text"


# --------------------------------------------------------------------------- retrieval

@pytest.mark.parametrize("family", FAMILIES)
def test_retrieval_finds_the_passage_that_shares_the_query_words(family, tmp_path):
    model = encoder(family)
    context = context_for(model)
    (tmp_path / "topics.txt").write_text(topic_text(48))
    (tmp_path / "shuffled.txt").write_text(topic_text(48, shuffled=True))
    right = retrieval(model, RetrievalOptions(text=str(tmp_path / "topics.txt")), context)
    wrong = retrieval(model, RetrievalOptions(text=str(tmp_path / "shuffled.txt")), context)
    assert right["retrieval_pairs"] == wrong["retrieval_pairs"] == 48
    assert right["recall_at_1"] > 0.4 and right["mrr_at_10"] > 0.5
    # the same queries against passages that belong to other queries: about chance (1/48)
    assert wrong["recall_at_1"] < 0.1 and wrong["mrr_at_10"] < 0.15
    broken = retrieval(zeroed(copy.deepcopy(model)), RetrievalOptions(text=str(tmp_path / "topics.txt")), context)
    assert broken["recall_at_1"] == 0.0 and broken["mrr_at_10"] == 0.0


def test_retrieval_on_the_bundled_text_beats_chance_and_a_broken_model_loses_it():
    model = encoder()
    context = context_for(model)
    options = RetrievalOptions(pairs=128)
    intact = retrieval(model, options, context)
    chance_mrr = sum(1 / r for r in range(1, 11)) / 128
    assert intact["retrieval_pairs"] == 128
    assert intact["mrr_at_10"] > 2 * chance_mrr  # a random tiny encoder still matches words
    broken = retrieval(zeroed(copy.deepcopy(model)), options, context)
    assert broken["recall_at_1"] == 0.0 and broken["mrr_at_10"] == 0.0


def test_retrieval_needs_two_paragraphs(tmp_path):
    (tmp_path / "one.txt").write_text(" One two three . Four five six . Seven eight nine . \n")
    with pytest.raises(PocketError, match="retrieval needs at least 2"):
        retrieval(encoder(), RetrievalOptions(text=str(tmp_path / "one.txt")), context_for(encoder()))


# --------------------------------------------------------------------------- latency

def test_latency_of_an_encoder_is_sentences_per_second():
    model = encoder()
    result = latency(model, LatencyOptions(repeats=1, max_length=32), context_for(model))
    assert set(result) == {"sentences_per_s_batch1", "sentences_per_s_batch32"}
    assert all(value > 0 for value in result.values())


def test_latency_of_a_causal_lm_is_still_tokens_per_second():
    model = tiny_model("llama")
    result = latency(model, LatencyOptions(prompt_tokens=16, new_tokens=4, repeats=1),
                     make_context(tokenizer=tiny_tokenizer()))
    assert set(result) == {"forward_tokens_per_s", "generate_tokens_per_s"}


# --------------------------------------------------------------------------- guards

@pytest.mark.parametrize(("metric", "evaluate", "options"), [
    ("perplexity", perplexity, PerplexityOptions(windows=1, seq_len=32)),
    ("kl-divergence", kl_divergence, DivergenceOptions(windows=1, seq_len=32)),
    ("top1-agreement", top1_agreement, DivergenceOptions(windows=1, seq_len=32)),
])
@pytest.mark.parametrize("family", ["bert", "bert-mlm"])
def test_next_token_metrics_refuse_an_encoder(metric, evaluate, options, family):
    model = encoder(family)
    with pytest.raises(PocketError) as caught:
        evaluate(model, options, context_for(model))
    error = caught.value
    assert metric in error.message and f"'{family}'" in error.message and "encoder" in error.message
    assert error.field == "evaluate.metrics" and "embedding-fidelity or retrieval" in error.fix


@pytest.mark.parametrize("evaluate, options", [(embedding_fidelity, FidelityOptions(sentences=4)),
                                               (retrieval, RetrievalOptions(pairs=4))])
def test_encoder_metrics_refuse_a_causal_lm(evaluate, options):
    model = tiny_model("llama")
    with pytest.raises(PocketError, match="architecture 'llama'") as caught:
        evaluate(model, options, make_context(tokenizer=tiny_tokenizer(), teacher=model))
    assert "perplexity" in caught.value.fix


def test_the_encoder_evaluators_are_registered_with_closed_options():
    from pocketlm.plugins import get_plugins

    evaluators = get_plugins().evaluators
    assert evaluators["embedding-fidelity"].options is FidelityOptions
    assert evaluators["retrieval"].options is RetrievalOptions
    with pytest.raises(ValueError):
        RetrievalOptions(pair=10)
    assert LatencyOptions().prompt_tokens == 128 and LatencyOptions().max_length == 128
