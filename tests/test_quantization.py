import pytest
import torch

from evosearch.database.hessian import layer_error
from evosearch.database.quantization import GPTQ, QuantFormat, rtn_quantize
from layer_data import layer  # noqa: F401 (fixture)

FORMATS = [QuantFormat(b, gs, sym) for b in (2, 3, 8) for gs in (None, 100) for sym in (False, True)]


def check_layout(qw, W, fmt):
    groups = 1 if fmt.group_size is None else -(-W.shape[1] // fmt.group_size)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == W.shape
    assert qw.scales.shape == qw.zeros.shape == (W.shape[0], groups)
    assert int(qw.codes.max()) <= fmt.maxq and int(qw.zeros.max()) <= fmt.maxq
    assert (qw.scales > 0).all()
    if fmt.symmetric:
        assert (qw.zeros == 2 ** (fmt.bits - 1)).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_codes_in_range_and_dequantise_formula_exact(layer, fmt):
    W, h, _ = layer
    for qw in (rtn_quantize(W, fmt), GPTQ(W, h.H).quantize(fmt), GPTQ(W, h.H, act_order=True).quantize(fmt)):
        check_layout(qw, W, fmt)
        columns = torch.arange(W.shape[1])
        g = columns // fmt.group_size if fmt.group_size else torch.zeros_like(columns)
        by_hand = qw.scales[:, g] * (qw.codes.float() - qw.zeros[:, g].float())
        assert torch.equal(qw.dequantize(), by_hand)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_rtn_rounds_to_nearest_grid_point(layer, fmt):
    W, _, _ = layer
    qw = rtn_quantize(W, fmt)
    g = fmt.group_index(W.shape[1])
    half_step = qw.scales[:, g] / 2
    assert ((W - qw.dequantize()).abs() <= half_step + 1e-6 * W.abs().max()).all()


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, None), (4, 100), (8, 128)])
def test_rtn_is_lossless_on_a_weight_already_on_the_grid(bits, group_size):
    g = torch.Generator().manual_seed(bits)
    fmt = QuantFormat(bits, group_size)
    rows, cols = 12, 256
    groups = fmt.group_index(cols)
    n_groups = int(groups[-1]) + 1
    codes = torch.randint(0, fmt.maxq + 1, (rows, cols), generator=g)
    starts = torch.tensor([int((groups == k).nonzero()[0]) for k in range(n_groups)])
    codes[:, starts], codes[:, starts + 1] = 0, fmt.maxq  # every group spans the full code range
    zeros = torch.randint(0, fmt.maxq + 1, (rows, n_groups), generator=g)
    scales = 2.0 ** torch.randint(-9, -3, (rows, n_groups), generator=g).float()
    W = scales[:, groups] * (codes - zeros[:, groups]).float()
    qw = rtn_quantize(W, fmt)
    assert torch.equal(qw.dequantize(), W)
    assert torch.equal(qw.codes.long(), codes) and torch.equal(qw.zeros.long(), zeros)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn(layer, bits, group_size, act_order):
    W, h, _ = layer
    for symmetric in (False, True):
        fmt = QuantFormat(bits, group_size, symmetric)
        rtn = layer_error(W, rtn_quantize(W, fmt).dequantize(), h.H)
        gptq = layer_error(W, GPTQ(W, h.H, act_order=act_order).quantize(fmt).dequantize(), h.H)
        assert gptq < 0.5 * rtn


def test_error_shrinks_with_bits(layer):
    W, h, _ = layer
    gptq = GPTQ(W, h.H)
    for quantize in (lambda f: rtn_quantize(W, f), gptq.quantize):
        errors = [layer_error(W, quantize(QuantFormat(b, 64)).dequantize(), h.H) for b in range(2, 9)]
        assert all(a > 2 * b for a, b in zip(errors, errors[1:]))


def test_gptq_setup_reused_across_formats_matches_fresh_setup(layer):
    W, h, _ = layer
    for act_order in (False, True):
        shared = GPTQ(W, h.H, act_order=act_order)
        for fmt in (QuantFormat(2, 64), QuantFormat(4, None, True), QuantFormat(3, 128)):
            a, b = shared.quantize(fmt), GPTQ(W, h.H, act_order=act_order).quantize(fmt)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def random_layer(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and a random SPD Hessian with correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols**0.5
    return 0.05 * torch.randn(rows, cols, generator=g), X.T @ X / len(X)


def assert_same(a, b):
    assert a.fmt == b.fmt and a.dtype == b.dtype
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_many_is_quantize_per_format(act_order, group_size, masked, symmetric):
    # 97 rows, 300 columns: no shape a stacked sweep could get right by luck of alignment.
    W, H = random_layer(97, 300)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) > 0.5 if masked else None
    fmts = [QuantFormat(bits, group_size, symmetric) for bits in (2, 3, 4, 5, 6)]
    gptq = GPTQ(W, H, act_order=act_order)
    for fmt, many in zip(fmts, gptq.quantize_many(fmts, keep), strict=True):
        assert_same(many, gptq.quantize(fmt, keep))
        if masked:
            assert (many.dequantize()[~keep] == 0).all()


def test_quantize_many_groups_formats_that_cannot_share_a_sweep():
    W, H = random_layer(40, 200, seed=2)
    fmts = [QuantFormat(4, 64), QuantFormat(3, None), QuantFormat(2, 64), QuantFormat(4, 64, True), QuantFormat(4, 64)]
    gptq = GPTQ(W, H)
    for fmt, many in zip(fmts, gptq.quantize_many(fmts), strict=True):
        assert_same(many, gptq.quantize(fmt))
    assert gptq.quantize_many([]) == []


def test_act_order_keeps_groups_contiguous_in_original_order(layer):
    # Static groups are fitted on the original W, so their grids are RTN's grids.
    W, h, _ = layer
    fmt = QuantFormat(4, 64)
    gptq, rtn = GPTQ(W, h.H, act_order=True).quantize(fmt), rtn_quantize(W, fmt)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


@pytest.mark.parametrize("act_order,fmt", [(False, QuantFormat(3, None)), (False, QuantFormat(3, 32)), (True, QuantFormat(3, 64))])
def test_gptq_lazy_block_update_is_exact(layer, act_order, fmt):
    # Blocks only regroup the same sequential updates (and group grids are fitted on
    # fully updated weights), so the block size must not change the result.
    W, h, _ = layer
    small = GPTQ(W, h.H, block_size=32, act_order=act_order).quantize(fmt)
    whole = GPTQ(W, h.H, block_size=256, act_order=act_order).quantize(fmt)
    assert (small.codes != whole.codes).float().mean() < 1e-3
    e_small, e_whole = layer_error(W, small.dequantize(), h.H), layer_error(W, whole.dequantize(), h.H)
    assert abs(e_small - e_whole) < 1e-3 * e_whole


def test_inputs_untouched_and_dtype_kept(layer):
    W, h, _ = layer
    W16 = W.to(torch.bfloat16)
    copy = W16.clone()
    for qw in (rtn_quantize(W16, QuantFormat(4)), GPTQ(W16, h.H, act_order=True).quantize(QuantFormat(4))):
        assert qw.dequantize().dtype == torch.bfloat16
    assert torch.equal(W16, copy)


def test_format_validation():
    with pytest.raises(ValueError):
        QuantFormat(1)
    with pytest.raises(ValueError):
        QuantFormat(4, 0)
