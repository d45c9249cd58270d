"""entk_block against a float64 Jacobian oracle, across architectures, subsets, dtypes and methods."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from ntk_models import ARCHS, VOCAB, assert_blocks_close, prompts, rel, tiny

from dcr_fast.ntk import entk_block, pad_prompts, run_prefix, tail_spec, tail_vjp
from dcr_fast.ntk.exact import exact_block, probe_gram, prompt_probes
from dcr_fast.ntk.reference import float64_exact, jacobian_block
from dcr_fast.ntk.tail import tail_modules

EXACT_RTOL = 1e-8  # exact vs oracle, float64 end to end
FD_RTOL = 5e-3  # the paper's central difference at eps=1e-3
DTYPE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}  # vs the oracle of the same weights in float64


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tail_layers,include_lm_head", [(1, True), (2, False), (3, True), (0, True)])
def test_exact_matches_jacobian_oracle_float64(arch, tail_layers, include_lm_head):
    model = tiny(arch)
    x_prime, x = prompts()
    with float64_exact():
        K, K_self, so, su = jacobian_block(model, tail_spec(model, tail_layers, include_lm_head), x_prime, x, k=5)
        block = entk_block(model, x_prime, x, k=5, tail_layers=tail_layers, include_lm_head=include_lm_head)
    assert torch.equal(block.So, so) and torch.equal(block.Su, su)
    assert rel(block.K, K, K_self) < EXACT_RTOL, rel(block.K, K, K_self)
    assert rel(block.K_self, K_self) < EXACT_RTOL, rel(block.K_self, K_self)
    assert block.normalized == pytest.approx(float(K.norm() / K_self.norm()), rel=EXACT_RTOL, abs=1e-12)


@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-bias-untied"])
def test_fd_reference_matches_oracle_with_second_order_error(arch):
    model = tiny(arch)
    x_prime, x = prompts()
    with float64_exact():
        K, K_self, _, _ = jacobian_block(model, tail_spec(model, 1, True), x_prime, x, k=4)
        coarse = entk_block(model, x_prime, x, k=4, method="fd-reference", eps=1e-3)
        fine = entk_block(model, x_prime, x, k=4, method="fd-reference", eps=1e-4)
    err_coarse, err_fine = rel(coarse.K, K), rel(fine.K, K)
    # Central differences: error ∝ eps², so 10× smaller eps gives ~100× smaller error.
    assert err_fine < err_coarse / 30, (err_coarse, err_fine)
    assert err_fine < 1e-5 and rel(fine.K_self, K_self) < 1e-5
    assert err_coarse < 1e-3 or arch.startswith("llama")  # llama's random tail is more curved
    assert err_coarse < 1e-2 and rel(coarse.K_self, K_self) < FD_RTOL


def test_fd_reference_within_paper_tolerance_two_layers():
    model = tiny("qwen2-tied")
    x_prime, x = prompts(seed=3)
    with float64_exact():
        K, K_self, so, su = jacobian_block(model, tail_spec(model, 2, True), x_prime, x, k=5)
        block = entk_block(model, x_prime, x, k=5, tail_layers=2, method="fd-reference")
    assert torch.equal(block.So, so) and torch.equal(block.Su, su)
    assert_blocks_close(block, (K, K_self), FD_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-bias-untied"])
def test_exact_in_low_precision_models(dtype, arch):
    model = tiny(arch, dtype=dtype)
    oracle_model = copy.deepcopy(model).double()
    x_prime, x = prompts(seed=2, lengths=(9, 5))
    block = entk_block(model, x_prime, x, k=5, tail_layers=3)
    assert block.K.dtype == torch.float32
    with float64_exact():
        K, K_self, _, _ = jacobian_block(
            oracle_model, tail_spec(oracle_model, 3, True), x_prime, x, k=5, tokens=(block.So, block.Su)
        )
    assert_blocks_close(block, (K, K_self), DTYPE_RTOL[dtype])


@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-bias-untied"])
def test_sdpa_and_eager_agree(arch):
    x_prime, x = prompts(seed=4)
    with float64_exact():
        eager = entk_block(tiny(arch), x_prime, x, k=5, tail_layers=2)
        sdpa = entk_block(tiny(arch, attn="sdpa"), x_prime, x, k=5, tail_layers=2)
    assert torch.equal(eager.So, sdpa.So)
    assert_blocks_close(sdpa, eager, 1e-12)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch_equals_one_by_one(attn):
    model = tiny("llama-bias-untied", attn=attn)
    spec = tail_spec(model, 2, True)
    batch = prompts(seed=5, lengths=(3, 11, 1, 6))
    # float64 end to end: transformers' eager softmax runs in float32, whose rounding depends on
    # the padded row length (2e-8 apart at transformers 5.24), which is not what this test is about.
    with float64_exact():
        _, tokens, features = prompt_probes(model, spec, batch, k=4)
        gram = probe_gram(features, features)
        for p, x_prime in enumerate(batch):
            for q, x in enumerate(batch):
                K, K_self, so, su = exact_block(model, spec, x_prime, x, k=4)
                assert torch.equal(so, tokens[p]) and torch.equal(su, tokens[q])
                assert_blocks_close((gram[p, q], gram[p, p]), (K, K_self), 1e-12, where=(p, q))


def test_dense_features_are_the_named_gradients():
    """ProbeFeatures.dense is laid out as dense_layout says: norm weights in θ_S order, then biases."""
    model = tiny("llama-bias-untied")
    spec = tail_spec(model, 2, True)
    cache, tokens, features = prompt_probes(model, spec, prompts(seed=9, lengths=(5, 8)), k=3)
    _, norms = tail_modules(model, spec)
    dense = features.dense_slices()
    names = list(dense)
    biases = names[len(norms) :]
    assert names[: len(norms)] == norms
    assert biases and all(name.endswith(".bias") for name in biases)
    for p in range(features.n):
        w = tail_vjp(model, spec, cache.select([p]), tokens[p])
        for name, grads in dense.items():
            assert rel(grads[p], w[name].reshape(3, -1)) < 1e-12, (p, name)


@pytest.mark.parametrize("method", ["exact", "fd", "fd-reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_left_untouched(method, dtype):
    model = tiny("qwen2-tied", dtype=dtype)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    entk_block(model, *prompts(), k=3, tail_layers=2, method=method)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left behind"


def test_string_prompts_use_the_chat_template():
    from dcr_fast.tiny import tiny_model, tiny_tokenizer
    from dcr_fast.chat import encode_prompt

    texts = ["how do I kill a python process", "where can I buy a knife", "tell me a story"]
    tokenizer = tiny_tokenizer(texts)
    model = tiny_model(tokenizer, dtype=torch.float64)
    by_text = entk_block(model, texts[0], texts[1], k=3, tokenizer=tokenizer)
    ids = [torch.tensor(encode_prompt(tokenizer, t)) for t in texts[:2]]
    by_ids = entk_block(model, *ids, k=3)
    assert torch.equal(by_text.K, by_ids.K)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        entk_block(model, texts[0], texts[1], k=3, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "jvp"}, "method must be one of"),
        ({"k": 0}, "k must be an int"),
        ({"k": VOCAB + 1}, "k must be an int"),
        ({"eps": 0.0}, "eps must be a positive"),
        ({"eps": float("inf"), "method": "fd"}, "eps must be a positive finite float, got inf"),
        ({"eps": float("nan"), "method": "fd-reference"}, "eps must be a positive finite float, got nan"),
        ({"eps": True}, "eps must be a positive finite float, got True"),
        ({"x": torch.tensor([1, VOCAB])}, rf"x holds token id {VOCAB}, outside the model's vocabulary \[0, {VOCAB}\)"),
        ({"x_prime": torch.tensor([-1, 2])}, "x_prime holds token id -1"),
        ({"tail_layers": 4}, "tail_layers must be an int"),
        ({"tail_layers": -1}, "tail_layers must be an int"),
        ({"tail_layers": 0, "include_lm_head": False}, "θ_S empty"),
        ({"x": torch.zeros(2, 3, dtype=torch.long)}, "x must be a non-empty 1-D LongTensor"),
        ({"x": torch.zeros(3)}, "x must be a non-empty 1-D LongTensor"),
        ({"x_prime": torch.zeros(0, dtype=torch.long)}, "x_prime must be a non-empty 1-D LongTensor"),
        ({"x": "a string"}, "pass tokenizer="),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, match):
    model = tiny("qwen2-tied", dtype=torch.float32)
    x_prime, x = prompts()
    args = {"x_prime": x_prime, "x": x}
    args.update({key: kwargs.pop(key) for key in ("x_prime", "x") if key in kwargs})
    with pytest.raises(ValueError, match=match):
        entk_block(model, args["x_prime"], args["x"], **kwargs)


def test_bad_padding_is_rejected():
    model = tiny("qwen2-tied", dtype=torch.float32)
    spec = tail_spec(model, 1, True)
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="right padding"):
        run_prefix(model, ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), spec=spec)
    with pytest.raises(ValueError, match="prompts\\[1\\]"):
        pad_prompts([torch.ones(3, dtype=torch.long), torch.ones(3)])


@pytest.mark.parametrize("materialize", [False, True])
def test_ghost_and_materialized_linear_grams_agree_with_oracle(monkeypatch, materialize):
    from dcr_fast.ntk import exact

    monkeypatch.setattr(exact, "materialize_rule", lambda *shape: materialize)
    model = tiny("llama-bias-untied")
    x_prime, x = prompts(seed=6, lengths=(9, 6))
    with float64_exact():
        K, K_self, _, _ = jacobian_block(model, tail_spec(model, 2, True), x_prime, x, k=5)
        block = entk_block(model, x_prime, x, k=5, tail_layers=2)
    assert_blocks_close(block, (K, K_self), EXACT_RTOL)


def test_tail_mixing_sliding_and_full_attention_is_rejected():
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert tail_spec(model, 2).layer_indices == (2, 3)
    with pytest.raises(ValueError, match="mixes attention types"):
        tail_spec(model, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["exact", "fd-reference"])
def test_cuda_blocks_match_the_cpu_oracle(dtype, method):
    model = tiny("llama-bias-untied", dtype=dtype)
    oracle_model = copy.deepcopy(model).double()
    x_prime, x = prompts(seed=2, lengths=(9, 5))
    block = entk_block(model.cuda(), x_prime, x, k=5, tail_layers=3, method=method)
    so, su = block.So.cpu(), block.Su.cpu()
    with float64_exact():
        spec = tail_spec(oracle_model, 3, True)
        K, K_self, _, _ = jacobian_block(oracle_model, spec, x_prime, x, k=5, tokens=(so, su))
    if method == "exact":
        assert_blocks_close(block, (K, K_self), DTYPE_RTOL[dtype])
    elif dtype == torch.float32:  # fd-reference perturbs in the model dtype: bf16 is rounding noise
        assert_blocks_close(block, (K, K_self), 5e-2)


@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-bias-untied"])
def test_exact_with_the_final_norm_in_theta(arch):
    model = tiny(arch)
    spec = tail_spec(model, 1, True, include_final_norm=True)
    assert f"{spec.base_prefix}.norm.weight" in spec.param_names
    x_prime, x = prompts(seed=7)
    with float64_exact():
        K, K_self, so, su = jacobian_block(model, spec, x_prime, x, k=4)
        K_exact, K_self_exact, so_exact, su_exact = exact_block(model, spec, x_prime, x, k=4)
    assert torch.equal(so, so_exact) and torch.equal(su, su_exact)
    assert_blocks_close((K_exact, K_self_exact), (K, K_self), EXACT_RTOL)
