"""The batched finite-difference eNTK (method="fd") against the paper's fd-reference, the exact
Gram and itself under batching, chunking and the pure-PyTorch op."""

from __future__ import annotations

import pytest
import torch
from ntk_models import ARCHS, assert_blocks_close, prompts, rel, tiny

from dcr_fast.ntk import entk_block, fd, tail_spec
from dcr_fast.ntk.exact import prompt_probes
from dcr_fast.ntk.probe_ops import probe_linear_reference
from dcr_fast.ntk.reference import float64_exact

SAME_AS_REFERENCE = 1e-6  # fd vs fd-reference, float64: only rounding differs (both use ε = 1e-3)
FD_VS_EXACT = 5e-3  # ε = 1e-3 truncation error; fp32/bf16 models are measured in fp32 by both


def _block(model, x_prime, x, method, **kwargs):
    with float64_exact():
        return entk_block(model, x_prime, x, method=method, **kwargs)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tail_layers, include_lm_head", [(1, True), (2, False), (3, True)])
def test_fd_matches_fd_reference_float64(arch, tail_layers, include_lm_head):
    model = tiny(arch)
    x_prime, x = prompts()
    kwargs = {"k": 5, "tail_layers": tail_layers, "include_lm_head": include_lm_head}
    fast, ref = _block(model, x_prime, x, "fd", **kwargs), _block(model, x_prime, x, "fd-reference", **kwargs)
    assert torch.equal(fast.So, ref.So) and torch.equal(fast.Su, ref.Su)
    assert fast.K.dtype == torch.float64
    assert_blocks_close(fast, ref, SAME_AS_REFERENCE)
    assert fast.normalized == pytest.approx(ref.normalized, rel=SAME_AS_REFERENCE)


@pytest.mark.parametrize("arch", ["qwen2-untied", "llama-bias-untied"])
def test_fd_matches_fd_reference_on_sdpa_models(arch):
    """fd runs the last tail layer at the last position with eager attention; the reference, SDPA."""
    model = tiny(arch, attn="sdpa")
    x_prime, x = prompts(seed=7, lengths=(5, 9))
    kwargs = {"k": 5, "tail_layers": 2}
    fast, ref = _block(model, x_prime, x, "fd", **kwargs), _block(model, x_prime, x, "fd-reference", **kwargs)
    assert_blocks_close(fast, ref, SAME_AS_REFERENCE)


@pytest.mark.parametrize("tail_layers", [1, 2])
def test_last_position_layer_equals_the_full_layer(tail_layers, monkeypatch):
    model = tiny("llama-bias-untied")
    spec = tail_spec(model, tail_layers, True)
    cache, tokens, features = prompt_probes(model, spec, prompts(seed=8, lengths=(6, 2, 9)), k=3)
    with float64_exact():
        short = fd.fd_blocks(model, spec, cache, tokens, features)
        monkeypatch.setattr(fd, "_last_position_supported", lambda layer, kwargs: False)
        full = fd.fd_blocks(model, spec, cache, tokens, features)
    assert rel(short, full) < 1e-10


def test_fd_lm_head_only_matches_fd_reference():
    """tail_layers=0: only lm_head is perturbed, K is [a = b]·h(x')·h(x) on the shared tokens."""
    model = tiny("qwen2-untied")
    x_prime = prompts()[0]
    fast, ref = _block(model, x_prime, x_prime, "fd", k=4, tail_layers=0), _block(
        model, x_prime, x_prime, "fd-reference", k=4, tail_layers=0
    )
    assert_blocks_close(fast, ref, SAME_AS_REFERENCE)
    assert torch.count_nonzero(fast.K - torch.diag(torch.diagonal(fast.K))) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-tied", "llama-bias-untied"])
def test_fd_close_to_exact(dtype, arch):
    model = tiny(arch, dtype=dtype)
    x_prime, x = prompts(seed=2, lengths=(9, 5))
    kwargs = {"k": 5, "tail_layers": 1}
    fast, exact = _block(model, x_prime, x, "fd", **kwargs), _block(model, x_prime, x, "exact", **kwargs)
    assert fast.K.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(fast.So, exact.So) and torch.equal(fast.Su, exact.Su)
    assert_blocks_close(fast, exact, FD_VS_EXACT)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batches_and_chunks_equal_one_by_one(attn):
    model = tiny("llama-bias-untied", attn=attn)
    spec = tail_spec(model, 2, True)
    batch = prompts(seed=5, lengths=(3, 11, 1, 6))
    # float64 end to end (transformers' eager softmax runs in float32, rounded differently per
    # padded length), so that padding and chunking are all that differs.
    with float64_exact():
        cache, tokens, features = prompt_probes(model, spec, batch, k=4)
        whole = fd.fd_blocks(model, spec, cache, tokens, features)
        # A budget of one probe prompt and one query per pass forces every chunking path.
        chunked = fd.fd_blocks(model, spec, cache, tokens, features, max_rows=1)
        assert rel(chunked, whole) < 1e-12
        for q, x_prime in enumerate(batch):
            for p, x in enumerate(batch):
                K, K_self, so, su = fd.fd_block(model, spec, x_prime, x, k=4, eps=1e-3)
                assert torch.equal(so, tokens[q]) and torch.equal(su, tokens[p])
                assert_blocks_close((whole[q, p], whole[q, q]), (K, K_self), 1e-10, where=(q, p))


def test_compiled_op_and_torch_reference_give_the_same_fd(monkeypatch):
    model = tiny("qwen2-untied")
    x_prime, x = prompts(seed=6)
    with_op = _block(model, x_prime, x, "fd", k=5, tail_layers=2)
    calls = []

    def counting_reference(*args):
        calls.append(args[0].shape)
        return probe_linear_reference(*args)

    monkeypatch.setattr(fd, "probe_linear", counting_reference)
    with_reference = _block(model, x_prime, x, "fd", k=5, tail_layers=2)
    assert len(calls) == 2 * 7  # 7 linear layers per decoder layer, one call each per pass
    assert {shape[0] for shape in calls} == {2 * 2 * 5}  # ±ε × 2 probe prompts × k tokens
    assert_blocks_close(with_op, with_reference, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_parameters_bit_identical_and_modules_restored(dtype, monkeypatch):
    model = tiny("qwen2-tied", dtype=dtype)
    modules = dict(model.named_modules())
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    entk_block(model, *prompts(), k=3, tail_layers=2, method="fd")

    def failing(*args):
        raise RuntimeError("injected failure inside the probing pass")

    monkeypatch.setattr(fd, "probe_linear", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        entk_block(model, *prompts(), k=3, tail_layers=2, method="fd")
    assert dict(model.named_modules()) == modules
    for name, value in before.items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"eps": 0.0}, "eps must be a positive"), ({"max_rows": 0}, "max_rows must be a positive int")],
)
def test_bad_options_are_value_errors(kwargs, match):
    model = tiny("qwen2-tied", dtype=torch.float32)
    spec = tail_spec(model, 1, True)
    cache, tokens, features = prompt_probes(model, spec, prompts(), k=3)
    with pytest.raises(ValueError, match=match):
        fd.fd_blocks(model, spec, cache, tokens, features, **kwargs)
    with pytest.raises(ValueError, match="query_tokens must be"):
        fd.fd_blocks(model, spec, cache, tokens[:1], features)


def test_features_of_another_theta_are_rejected():
    model = tiny("llama-bias-untied", dtype=torch.float32)
    cache, tokens, features = prompt_probes(model, tail_spec(model, 1, True), prompts(), k=3)
    with pytest.raises(ValueError, match="recorded for another θ_S"):
        fd.fd_blocks(model, tail_spec(model, 2, True), cache, tokens, features)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-bias-untied"])
def test_fd_on_cuda_matches_fd_reference_and_exact(arch):
    model = tiny(arch).cuda()
    x_prime, x = (p.cuda() for p in prompts())
    kwargs = {"k": 5, "tail_layers": 2}
    fast, ref = _block(model, x_prime, x, "fd", **kwargs), _block(model, x_prime, x, "fd-reference", **kwargs)
    assert fast.K.is_cuda and torch.equal(fast.Su, ref.Su)
    assert_blocks_close(fast, ref, SAME_AS_REFERENCE)
    model32 = tiny(arch, dtype=torch.float32).cuda()
    fast32, exact32 = _block(model32, x_prime, x, "fd", **kwargs), _block(model32, x_prime, x, "exact", **kwargs)
    assert_blocks_close(fast32, exact32, 2 * FD_VS_EXACT)
