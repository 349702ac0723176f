import math

import pytest
import torch

from evosearch.evaluate import Teacher, kl_divergence, kl_divergence_topk, perplexity


def windows(n=4, length=32, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_perplexity_matches_the_model_loss(llama):
    w = windows()
    result = perplexity(llama, w, progress=False)
    expected = torch.stack([llama(x[None], labels=x[None]).loss for x in w]).mean()
    assert result.tokens == 4 * 31
    assert math.isclose(result.loss, expected.item(), rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(expected.item()), rel_tol=1e-5)


def test_kl_is_zero_for_the_dense_model_and_grows_with_zeroed_weights(llama):
    teacher = Teacher.build(llama, windows(), progress=False)
    assert teacher.kl(llama) == pytest.approx(0.0, abs=1e-5)
    kls = []
    for layer in llama.model.layers:  # zero more and more of the model
        layer.mlp.down_proj.weight.zero_()
        kls.append(teacher.kl(llama))
        layer.self_attn.o_proj.weight.zero_()
        kls.append(teacher.kl(llama))
    assert kls[0] > 1e-4
    assert all(later > earlier for earlier, later in zip(kls, kls[1:]))


def test_kl_tokens_use_a_prefix_of_the_calibration_set(llama):
    teacher = Teacher.build(llama, windows(n=4), progress=False)
    llama.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    first_two = Teacher(teacher.sequences[:2], logprobs=teacher.logprobs[: 2 * 32])
    assert teacher.kl(llama, tokens=64) == pytest.approx(first_two.kl(llama), rel=1e-6)
    assert teacher.kl(llama, tokens=33) == pytest.approx(first_two.kl(llama), rel=1e-6)  # whole sequences


def test_topk_kl_equals_full_kl_when_k_is_the_vocabulary_and_bounds_it_below(llama):
    w = windows()
    full = Teacher.build(llama, w, progress=False)
    everything = Teacher.build(llama, w, top_k=128, progress=False)
    top8 = Teacher.build(llama, w, top_k=8, progress=False)
    llama.model.layers[1].mlp.down_proj.weight.zero_()
    assert everything.kl(llama) == pytest.approx(full.kl(llama), rel=1e-3)
    assert 0 < top8.kl(llama) <= full.kl(llama) * (1 + 1e-3)


def test_float16_teacher_is_close(llama):
    w = windows()
    full = Teacher.build(llama, w, progress=False)
    half = Teacher.build(llama, w, dtype=torch.float16, progress=False)
    llama.model.layers[1].mlp.down_proj.weight.zero_()
    assert half.logprobs.dtype == torch.float16
    assert half.kl(llama) == pytest.approx(full.kl(llama), rel=0.05)


def test_kl_reference_formulas():
    torch.manual_seed(0)
    t = torch.log_softmax(torch.randn(5, 11), -1)
    s = torch.randn(5, 11)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s, -1), t, log_target=True, reduction="sum")
    assert kl_divergence(t, s).item() == pytest.approx(expected.item(), rel=1e-5)
    values, indices = t.topk(11, -1)
    no_tail = torch.full((5,), float("-inf"))
    assert kl_divergence_topk(values, indices, no_tail, s).item() == pytest.approx(expected.item(), rel=1e-5)
    # top-3: the KL of the distributions coarsened to (3 tokens, the rest), computed directly
    values, indices = t.topk(3, -1)
    rest = torch.ones_like(t, dtype=torch.bool).scatter(-1, indices, False)
    p = torch.cat([values.exp(), (t.exp() * rest).sum(-1, keepdim=True)], -1)
    q_all = torch.softmax(s, -1)
    q = torch.cat([q_all.gather(-1, indices), (q_all * rest).sum(-1, keepdim=True)], -1)
    coarse = (p * (p.log() - q.log())).sum()
    tail = torch.log((t.exp() * rest).sum(-1))
    assert kl_divergence_topk(values, indices, tail, s).item() == pytest.approx(coarse.item(), rel=1e-5)


def test_teacher_save_and_load(tmp_path, llama):
    teacher = Teacher.build(llama, windows(), top_k=4, progress=False)
    teacher.save(tmp_path / "t.safetensors")
    loaded = Teacher.load(tmp_path / "t.safetensors")
    llama.model.layers[0].mlp.up_proj.weight.mul_(0.3)
    assert loaded.kl(llama) == teacher.kl(llama)


@pytest.mark.real
def test_real_model_perplexity_on_brown_matches_the_reference(real, brown):
    """ASSETS.md: 30.86 on the first 8,184 predicted tokens of Brown in sorted file order."""
    model, tokenizer = real
    result = perplexity(model, brown.evaluation_windows(8184, 1024), tokenizer=tokenizer, progress=False)
    assert result.tokens == 8184
    assert result.perplexity == pytest.approx(30.86, rel=0.01)
    assert result.bits_per_byte == pytest.approx(1.087, rel=0.01)
