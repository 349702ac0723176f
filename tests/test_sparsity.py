import pytest
import torch

from evosearch.database.hessian import layer_error
from evosearch.database.sparsity import SparseGPT, magnitude_prune, nm_mask_ok, wanda_prune
from layer_data import layer  # noqa: F401 (fixture)

NM_PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8)]


def all_methods(W, h):
    sparsegpt = SparseGPT(W, h.H)
    return {
        "magnitude": lambda s, nm=None: magnitude_prune(W, s, nm),
        "wanda": lambda s, nm=None: wanda_prune(W, h.column_norms(), s, nm),
        "sparsegpt": sparsegpt.prune,
    }


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.7, 0.9])
def test_exact_sparsity_per_layer(layer, sparsity):
    W, h, _ = layer
    for name, prune in all_methods(W, h).items():
        zeros = int((prune(sparsity) == 0).sum())
        assert zeros == round(sparsity * W.numel()), name


def test_wanda_prunes_every_row_to_its_share(layer):
    W, h, _ = layer
    per_row = (wanda_prune(W, h.column_norms(), 0.37) == 0).sum(dim=1).float()
    assert (per_row - 0.37 * W.shape[1]).abs().max() <= 1


@pytest.mark.parametrize("nm", NM_PATTERNS)
def test_nm_pattern_holds_in_every_group(layer, nm):
    W, h, _ = layer
    n, m = nm
    for name, prune in all_methods(W, h).items():
        W_hat = prune(n / m, nm)
        assert nm_mask_ok(W_hat, nm), name
        assert int((W_hat == 0).sum()) == W.numel() * n // m, name
    assert not nm_mask_ok(W, nm)


def test_nm_level_must_match_its_sparsity(layer):
    W, h, _ = layer
    with pytest.raises(ValueError, match="means sparsity 0.5"):
        magnitude_prune(W, 0.7, (2, 4))
    with pytest.raises(ValueError, match="multiple of m"):
        SparseGPT(W[:, :255], h.H[:255, :255]).prune(0.5, (2, 4))


def test_dense_level_returns_w_unchanged(layer):
    W, h, _ = layer
    W16 = W.to(torch.bfloat16)
    for name, prune in all_methods(W, h).items():
        assert torch.equal(prune(0.0), W), name
    assert torch.equal(SparseGPT(W16, h.H).prune(0.0), W16)
    assert torch.equal(wanda_prune(W16, h.column_norms(), 0.0), W16)


def test_inputs_are_untouched_and_dtype_device_kept(layer):
    W, h, _ = layer
    W16, H_before = W.to(torch.bfloat16), h.H.clone()
    copy = W16.clone()
    for W_hat in (SparseGPT(W16, h.H).prune(0.5), magnitude_prune(W16, 0.5), wanda_prune(W16, h.column_norms(), 0.5)):
        assert W_hat.dtype == torch.bfloat16 and W_hat.device == W16.device
    assert torch.equal(W16, copy) and torch.equal(h.H, H_before)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_error_ordering_on_correlated_inputs(layer, sparsity):
    W, h, _ = layer
    err = {name: layer_error(W, prune(sparsity), h.H) for name, prune in all_methods(W, h).items()}
    assert err["sparsegpt"] < 0.9 * err["wanda"]
    assert err["wanda"] <= err["magnitude"]


def test_sparsegpt_beats_magnitude_on_2_4(layer):
    W, h, _ = layer
    assert layer_error(W, SparseGPT(W, h.H).prune(0.5, (2, 4)), h.H) < layer_error(W, magnitude_prune(W, 0.5, (2, 4)), h.H)


def test_error_grows_with_sparsity(layer):
    W, h, _ = layer
    for name, prune in all_methods(W, h).items():
        errors = [layer_error(W, prune(s), h.H) for s in (0.0, 0.2, 0.4, 0.6, 0.8)]
        assert errors[0] == 0 and all(a < b for a, b in zip(errors, errors[1:])), name


def test_sparsegpt_setup_reused_across_levels_matches_fresh_setup(layer):
    W, h, _ = layer
    shared = SparseGPT(W, h.H)
    for sparsity, nm in [(0.7, None), (0.5, (2, 4)), (0.3, None), (0.5, None)]:
        assert torch.equal(shared.prune(sparsity, nm), SparseGPT(W, h.H).prune(sparsity, nm))


def test_sparsegpt_lazy_block_update_is_exact(layer):
    # The N:M mask is chosen column group by column group on fully updated weights,
    # so the block size only regroups the same arithmetic.
    W, h, _ = layer
    whole = SparseGPT(W, h.H, block_size=256).prune(0.5, (4, 8))
    for block_size in (16, 60):  # 60 is not a multiple of 8: blocks are rounded to whole groups
        small = SparseGPT(W, h.H, block_size=block_size).prune(0.5, (4, 8))
        assert torch.equal(small == 0, whole == 0)
        torch.testing.assert_close(small, whole, rtol=1e-4, atol=1e-5)


def test_sparsegpt_zeroes_dead_input_columns_first(layer):
    """Inputs that never fire carry nothing: their weights are zero after SparseGPT (as in every reference)
    and count among the level's zeros, so fewer live weights are pruned and the error is lower."""
    W, h, X = layer
    dead = torch.zeros(W.shape[1], dtype=torch.bool)
    dead[::8] = True  # an eighth of the inputs never fire
    Xd = X.clone()
    Xd[:, dead] = 0
    H = Xd.T @ Xd / len(Xd)
    pruned = SparseGPT(W, H).prune(0.5)
    assert (pruned[:, dead] == 0).all()
    assert int((pruned == 0).sum()) == W.numel() // 2  # the level's zeros, dead ones included
    live = ~dead
    assert int((pruned[:, live] == 0).sum()) == W.numel() // 2 - int(dead.sum()) * W.shape[0]
