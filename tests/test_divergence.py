"""kl-divergence and top1-agreement: the tensor functions on random 64x64 logits, and the
evaluators through a run whose original model is the teacher."""

import math

import torch
import torch.nn.functional as F

from pocketlm.builtins.evaluators import token_kl, top1_agreement_mask


def test_token_kl_matches_the_definition_and_is_zero_on_itself():
    torch.manual_seed(0)
    p, q = torch.randn(64, 64), torch.randn(64, 64)
    expected = torch.stack([sum(F.softmax(p[i], 0)[j] * (F.log_softmax(p[i], 0)[j] - F.log_softmax(q[i], 0)[j])
                                for j in range(64)) for i in range(64)])
    assert torch.allclose(token_kl(p, q), expected, atol=1e-5)
    assert token_kl(p, p).abs().max() < 1e-6
    assert (token_kl(p, q) > 0).all()
    # a shift of all logits by a constant leaves the distribution, hence the KL, unchanged
    assert torch.allclose(token_kl(p, q + 3.0), token_kl(p, q), atol=1e-5)


def test_top1_agreement_counts_equal_argmax():
    torch.manual_seed(0)
    p = torch.randn(64, 64)
    q = p.clone()
    q[:16] = -q[:16]  # negated rows: the argmax becomes the argmin
    agree = top1_agreement_mask(p, q)
    assert agree[16:].all() and not agree[:16].any()
    assert math.isclose(agree.float().mean().item(), 0.75)


def test_a_run_reports_divergence_and_agreement_against_the_original(tiny_folder, toy_plugins, tmp_path):
    from pocketlm.pipeline import Run, render_report
    from pocketlm.recipe import parse_recipe

    text = (f'[model]\nsource = "{tiny_folder}"\n[calibration]\nsamples = 2\nseq_len = 32\n'
            '[[stages]]\nmethod = "toy-round"\nbits = 4\n[evaluate]\nmetrics = ["kl-divergence", "top1-agreement"]\n'
            'per_stage = []\n[evaluate.kl-divergence]\nwindows = 2\nseq_len = 32\n'
            '[evaluate.top1-agreement]\nwindows = 2\nseq_len = 32\n')
    report = Run(parse_recipe(text, toy_plugins), tmp_path / "run", toy_plugins, echo=lambda m: None).execute()
    assert report["before"]["kl_divergence"] < 1e-6 and report["before"]["top1_agreement"] == 1.0
    assert report["after"]["kl_divergence"] > 1e-3
    assert report["after"]["kl_divergence_p99"] >= report["after"]["kl_divergence"]
    assert 0.0 < report["after"]["top1_agreement"] < 1.0
    table = render_report(report)
    assert "| KL divergence | top-1 agreement |" in table and "| before | 0.0000 | 100.0% |" in table
