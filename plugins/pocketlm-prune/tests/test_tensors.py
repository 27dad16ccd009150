"""The pure tensor functions, checked on random 64x64 matrices."""

import pytest
import torch

from pocketlm_prune.common import nm_mask, owl_sparsities, prune_lowest_per_row
from pocketlm_prune.depth import block_influence, lowest
from pocketlm_prune.magnitude import global_magnitude_masks, magnitude_mask
from pocketlm_prune.sparsegpt import hessian, sparsegpt_prune
from pocketlm_prune.wanda import wanda_mask
from pocketlm_prune.width import group_importance, head_rows, keep_top


def _data(seed=0, rows=64, cols=64, tokens=512, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)  # correlated inputs
    x = torch.randn(tokens, cols, generator=g) @ mix
    if outliers:
        x[:, :4] *= 20  # a few heavy channels, as in real LLM activations
    return w, x


def _error(w, new, x):
    return ((x @ w.t()) - (x @ new.t())).norm().item()


def test_magnitude_mask_prunes_exactly_the_smallest():
    w, _ = _data()
    mask = magnitude_mask(w, 0.5)
    assert int((~mask).sum()) == 64 * 32
    assert w[~mask].abs().max() <= w[mask].abs().min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_masks_have_the_exact_pattern(n, m):
    w, x = _data()
    for mask in (magnitude_mask(w, nm=(n, m)), wanda_mask(w, x.norm(dim=0), nm=(n, m)),
                 sparsegpt_prune(w, hessian(x), nm=(n, m))[1], nm_mask(torch.randn(64, 64), n, m)):
        assert (mask.view(64, -1, m).sum(-1) == n).all()


def test_wanda_prunes_each_row_equally_and_reduces_to_magnitude_with_flat_norms():
    w, x = _data()
    mask = wanda_mask(w, x.norm(dim=0), 0.5)
    assert (mask.sum(dim=1) == 32).all()
    flat = wanda_mask(w, torch.ones(64), 0.5)
    assert torch.equal(flat, prune_lowest_per_row(w.abs(), 0.5))


def test_sparsegpt_is_exact_and_reconstructs_better_than_wanda_than_magnitude():
    w, x = _data()
    h = hessian(x)
    for sparsity, nm in ((0.5, None), (0.6, None), (0.0, (2, 4))):
        new, mask = sparsegpt_prune(w, h, sparsity, nm, block_size=16)
        if nm is None:
            assert int((~mask).sum()) == round(64 * 64 * sparsity)
        assert (new[~mask] == 0).all()
        wanda = w * wanda_mask(w, x.norm(dim=0), sparsity, nm)
        magnitude = w * magnitude_mask(w, sparsity, nm)
        assert _error(w, new, x) < _error(w, wanda, x) < _error(w, magnitude, x)


def test_previous_masks_only_gain_zeros():
    w, x = _data()
    previous = torch.rand(64, 64, generator=torch.Generator().manual_seed(3)) > 0.3  # 30% pruned
    for mask in (magnitude_mask(w, 0.5, previous=previous), wanda_mask(w, x.norm(dim=0), 0.5, previous=previous),
                 sparsegpt_prune(w, hessian(x), 0.5, previous=previous)[1]):
        assert not (mask & ~previous).any()
        assert (~mask).float().mean() >= 0.5 - 1e-6
    new, mask = sparsegpt_prune(w, hessian(x), 0.1, previous=previous)  # more already pruned than asked
    assert torch.equal(mask, previous) and (new[~previous] == 0).all()


def test_global_magnitude_uses_one_threshold():
    w, _ = _data()
    weights = {"a": w, "b": w * 3}
    masks = global_magnitude_masks(weights, 0.5)
    total = sum(int((~m).sum()) for m in masks.values())
    assert total == 64 * 64
    assert (~masks["a"]).sum() > (~masks["b"]).sum()  # the small layer loses more


def test_owl_keeps_the_mean_and_spares_outlier_layers():
    ratios = [0.01, 0.05, 0.02, 0.10]
    result = owl_sparsities(ratios, 0.5, 0.08)
    assert abs(sum(result) / 4 - 0.5) < 1e-9
    assert max(result) - min(result) == pytest.approx(0.16)
    assert result.index(min(result)) == 3 and result.index(max(result)) == 0


def test_width_and_depth_helpers():
    q, kv = head_rows(torch.tensor([0, 2]), heads_per_group=2, head_dim=3)
    assert q.tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17] and kv.tolist() == [0, 1, 2, 6, 7, 8]
    assert group_importance(torch.tensor([1.0, 2, 3, 4]), 2).tolist() == [3, 7]
    assert keep_top(torch.tensor([5.0, 1, 4, 0, 3]), 3).tolist() == [0, 2, 4]
    x = torch.randn(10, 8)
    assert block_influence(x, x).abs() < 1e-5 and block_influence(x, -x) == pytest.approx(20)
    assert lowest([0.3, 0.1, 0.2, 0.5], 2) == [1, 2]
