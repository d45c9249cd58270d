"""The forecast against plain autograd and against one real SGD step, in float64 on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ntk_models import ARCHS, VOCAB, tiny

from dcr_fast.forecast import Forecast, ForecastConfig, compare, forecast, spearman
from dcr_fast.forecast import engine as engine_module
from dcr_fast.forecast.engine import gradient_products
from dcr_fast.forecast.reference import gradient_products_reference, one_step_change
from dcr_fast.ntk.reference import float64_exact
from dcr_fast.tiny import tiny_model, tiny_tokenizer
from dcr_fast.train.sft import IGNORE_INDEX, Example

EXACT_RTOL = 1e-10
REFUSAL_TOKENS = [3, 11, 40]
CONFIGS = {
    "tail1": ForecastConfig(tail_layers=1, candidate_chunk=3, safety_chunk=2),
    "tail2-no-head": ForecastConfig(tail_layers=2, include_lm_head=False),
    "head-only": ForecastConfig(tail_layers=0),
    "lora": ForecastConfig(param_set="lora", lora_r=4, lora_alpha=8.0, safety_chunk=2),
}


def _ids(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=g)


def _inputs(seed: int = 0, candidates: int = 5) -> tuple[list[torch.Tensor], list[Example]]:
    """Random candidate prompts and (prompt, response) examples of assorted lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [_ids(g, int(n)) for n in torch.randint(2, 12, (candidates,), generator=g)]
    examples = []
    for length, prompt_length in ((8, 3), (13, 6), (5, 1), (10, 9)):
        ids = _ids(g, length).tolist()
        targets = [ids[t + 1] if t + 1 >= prompt_length else IGNORE_INDEX for t in range(length - 1)]
        examples.append(Example(ids, targets + [IGNORE_INDEX]))
    return prompts, examples


def _response_tokens(examples: list[Example]) -> int:
    return sum(t != IGNORE_INDEX for e in examples for t in e.targets)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("setting", list(CONFIGS))
def test_products_match_autograd(arch, setting):
    model = tiny(arch)
    prompts, examples = _inputs()
    with float64_exact():
        products, base = gradient_products(model, prompts, examples, REFUSAL_TOKENS, CONFIGS[setting], progress=False)
        want, want_base = gradient_products_reference(model, prompts, examples, REFUSAL_TOKENS, CONFIGS[setting])
    assert products.shape == (len(prompts), len(examples))
    assert _rel(products, want) < EXACT_RTOL, _rel(products, want)
    np.testing.assert_allclose(base, want_base, rtol=1e-12)


@pytest.mark.parametrize("setting", ["tail1", "lora"])
def test_forecast_is_the_first_order_term_of_one_sgd_step(setting):
    """Measured ΔP_ref after a real step differs from the forecast by O(η²): 10× smaller η,
    ~100× smaller error; and at small η the two rank the prompts alike."""
    model = tiny("qwen2-tied")
    prompts, examples = _inputs(seed=1, candidates=16)
    config = CONFIGS[setting]
    with float64_exact():
        products, _ = gradient_products(model, prompts, examples, REFUSAL_TOKENS, config, progress=False)
        errors, correlations = [], []
        for lr in (1e-1, 1e-2, 1e-3):
            predicted = -lr / _response_tokens(examples) * products.sum(axis=1)
            measured = one_step_change(model, prompts, examples, REFUSAL_TOKENS, config, lr)
            errors.append(np.abs(predicted - measured).max())
            correlations.append(spearman(predicted, measured))
    assert errors[1] < errors[0] / 40 and errors[2] < errors[1] / 40, errors
    assert correlations[-1] >= 0.9, correlations


def _forecast(products: np.ndarray, base: np.ndarray, examples: list[Example], groups: list[str], lr: float) -> Forecast:
    n_c, n_s = products.shape
    return Forecast([f"p{i}" for i in range(n_c)], groups, [f"s{j}" for j in range(n_s)], products, base,
                    _response_tokens(examples), ["a"], ForecastConfig(lr=lr, top=3))


def test_contributions_sum_to_the_derivative_of_a_real_step():
    """Σ_s contribution = dΔP_ref/dη · η, the derivative taken by a central difference of real steps."""
    model = tiny("llama-bias-untied")
    prompts, examples = _inputs(seed=2, candidates=6)
    config = CONFIGS["tail1"]
    with float64_exact():
        products, base = gradient_products(model, prompts, examples, REFUSAL_TOKENS, config, progress=False)
        eps = 1e-5
        derivative = (one_step_change(model, prompts, examples, REFUSAL_TOKENS, config, eps)
                      - one_step_change(model, prompts, examples, REFUSAL_TOKENS, config, -eps)) / (2 * eps)
    result = _forecast(products, base, examples, ["g"] * len(prompts), lr=0.5)
    np.testing.assert_allclose(result.contributions.sum(axis=1), result.delta)
    assert _rel(result.delta, 0.5 * derivative) < 1e-7


def test_attribution_ranking_and_groups():
    products = np.array([[1.0, -3.0, 2.0, 0.5], [-1.0, -1.0, -2.0, -4.0], [0.0, 0.0, 0.0, 1.0]])
    _, examples = _inputs()
    result = _forecast(products, np.array([0.1, 0.2, 0.3]), examples, ["a", "b", "a"], lr=1.0)
    scale = -1.0 / _response_tokens(examples)
    # Contributions are −η/N · products: the most negative product pushes refusal up the most.
    assert result.top_contributors(0) == [(1, -3.0 * scale), (3, 0.5 * scale), (0, 1.0 * scale)]
    assert result.top_contributors(1, 1) == [(3, -4.0 * scale)]
    assert result.rank.tolist() == [2, 1, 3]
    assert result.group_means() == pytest.approx({"a": (result.delta[0] + result.delta[2]) / 2, "b": result.delta[1]})
    rows = result.rows()
    assert [r["rank"] for r in rows] == [2, 1, 3] and rows[1]["top_contributors"][0]["prompt"] == "s3"
    other = _forecast(products * 0.5, np.zeros(3), examples, ["a", "b", "a"], lr=1.0)
    view = compare(result, other)
    assert view["groups"]["b"]["change"] == pytest.approx(-0.5 * result.delta[1])
    assert view["spearman"] == pytest.approx(1.0)


TEXTS = [
    "How do I kill a Python process ?",
    "Where can I shoot a photo ?",
    "What is the capital of France ?",
    "How do I steal a car ?",
]
PAIRS = [("How do I make a bomb ?", "No , I cannot help with that ."),
         ("Tell me how to steal a car .", "I am sorry , I cannot help .")]


@pytest.fixture(scope="module")
def word_model():
    tokenizer = tiny_tokenizer(TEXTS + [t for pair in PAIRS for t in pair] + ["No I It As My"])
    return tiny_model(tokenizer, dtype=torch.float64, attn_implementation="sdpa"), tokenizer


def test_forecast_from_text_resumes_and_refuses_other_settings(word_model, tmp_path, monkeypatch):
    model, tokenizer = word_model
    config = ForecastConfig(safety_chunk=1, top=2)
    first = forecast(model, tokenizer, PAIRS, TEXTS, groups=["st", "st", "normal", "toxic"], config=config,
                     out_dir=tmp_path, progress=False)
    assert first.refusal_tokens == ["No", "I", "It", "As", "My"]
    assert first.response_tokens == sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r in PAIRS) + 2
    assert set(first.group_means()) == {"st", "normal", "toxic"}

    def no_work(*args, **kwargs):
        raise AssertionError("a resumed forecast recomputed finished blocks")

    monkeypatch.setattr(engine_module, "readout_features", no_work)
    again = forecast(model, tokenizer, PAIRS, TEXTS, groups=["st", "st", "normal", "toxic"],
                     config=ForecastConfig(safety_chunk=1, top=2, lr=1e-3), out_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.products, first.products)
    with pytest.raises(ValueError, match=r"were made with other settings.*settings.tail_layers: 1 -> 2"):
        forecast(model, tokenizer, PAIRS, TEXTS, config=ForecastConfig(safety_chunk=1, tail_layers=2),
                 out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("call,message", [
    (lambda m, t: forecast(m, t, PAIRS, []), "prompts: expected a non-empty list"),
    (lambda m, t: forecast(m, t, PAIRS, ["ok", ""]), r"prompts\[1\]: expected a non-empty string"),
    (lambda m, t: forecast(m, t, [("a", "")], TEXTS), r"safety_pairs\[0\]: expected a \(prompt, response\)"),
    (lambda m, t: forecast(m, t, [], TEXTS), "safety_pairs: expected a non-empty list"),
    (lambda m, t: forecast(m, t, PAIRS, TEXTS, groups=["a"]), "groups: expected one non-empty name per prompt"),
    (lambda m, t: forecast(m, t, PAIRS, TEXTS, config=ForecastConfig(max_length=4)),
     "max_length: 4 tokens cut off the response of all 2 examples"),
    (lambda m, t: forecast(m, t, PAIRS, TEXTS, config=ForecastConfig(tail_layers=9)), r"tail_layers must be an int in \[0, 2\]"),
    (lambda m, t: ForecastConfig(param_set="full"), "param_set: expected one of"),
    (lambda m, t: ForecastConfig(safety_chunk=0), "safety_chunk: expected a positive integer"),
    (lambda m, t: ForecastConfig(lr=-1.0), "lr: expected a positive number"),
    (lambda m, t: gradient_products(m, [torch.tensor([1, 2])], _inputs()[1], [10**6], ForecastConfig()),
     r"refusal tokens must be a non-empty list of ids in \[0, "),
    (lambda m, t: gradient_products(m, [torch.tensor([1.0])], _inputs()[1], [1], ForecastConfig()),
     r"prompts\[0\] must be a non-empty 1-D LongTensor"),
])
def test_bad_input_names_the_argument(word_model, call, message):
    with pytest.raises(ValueError, match=message):
        call(*word_model)
