"""dcr_fast.fingerprint: model identity by content, cached file hashes, keys that name what differs."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

from dcr_fast import fingerprint
from dcr_fast.tiny import save_tiny_model, tiny_model, tiny_tokenizer

TEXTS = ["how do I kill a python process", "tell me a story"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCR_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("fp") / "model"), TEXTS, hidden_size=16, layers=1)


def _counting_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = fingerprint.file_sha256

    def file_sha256(path):
        hashed.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(fingerprint, "file_sha256", file_sha256)
    return hashed


def test_identity_is_content_not_path(model_dir, tmp_path, cache):
    first = fingerprint.model_fingerprint(model_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(first["files"])
    copied = shutil.copytree(model_dir, tmp_path / "copy")
    (copied / "README.md").write_text("trained by me")  # provenance, not the model
    (copied / "dcr_fast_source.json").write_text('{"gguf": "/elsewhere/model.gguf"}')
    assert fingerprint.model_fingerprint(copied) == first
    config = json.loads((copied / "config.json").read_text())
    (copied / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    changed = fingerprint.model_fingerprint(copied)
    assert fingerprint.differences(first, changed)[0].startswith("files.config.json: sha256 ")
    assert changed["sha256"] != first["sha256"]
    assert [d.split(":")[0] for d in fingerprint.differences(first, changed)] == ["files.config.json", "sha256"]


def test_file_hashes_are_computed_once_per_file_state(model_dir, tmp_path, cache, monkeypatch):
    folder = shutil.copytree(model_dir, tmp_path / "m")
    hashed = _counting_hashes(monkeypatch)
    first = fingerprint.model_fingerprint(folder)
    assert sorted(hashed) == sorted(first["files"])
    hashed.clear()
    assert fingerprint.model_fingerprint(folder) == first and hashed == []  # from the cache, by stat
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert fingerprint.model_fingerprint(folder) == first and hashed == ["model.safetensors"]
    (cache / "file-hashes.json").write_text("{not json")  # a damaged cache only costs a rehash
    hashed.clear()
    assert fingerprint.model_fingerprint(folder) == first and len(hashed) == len(first["files"])


def test_a_hub_id_not_downloaded_is_named_only(monkeypatch, tmp_path, cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert fingerprint.model_fingerprint("someone/some-model") == {"hub_id": "someone/some-model"}


def test_module_fingerprint_follows_the_weights():
    model = tiny_model(tiny_tokenizer(TEXTS), hidden_size=16, layers=1)
    same = copy.deepcopy(model)
    assert fingerprint.module_fingerprint(same) == fingerprint.module_fingerprint(model)
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-6
    assert fingerprint.module_fingerprint(same) != fingerprint.module_fingerprint(model)
    assert fingerprint.module_fingerprint(model.double()) != fingerprint.module_fingerprint(same)


def test_check_key_records_then_names_every_difference(tmp_path):
    path = tmp_path / "key.json"
    key = {"model": {"sha256": "a" * 64}, "max_new_tokens": 64, "system_prompt": None, "sizes": (1, 2)}
    fingerprint.check_key(path, key, what="the results", remedy="do X", about={"model": "runs/a"})
    fingerprint.check_key(path, key, what="the results", remedy="do X")  # equal: silent (tuples read back as lists)
    other = {**key, "model": {"sha256": "b" * 64}, "max_new_tokens": 8, "judge": "guard"}
    with pytest.raises(ValueError) as raised:
        fingerprint.check_key(path, other, what="the results", remedy="do X")
    assert str(raised.value) == (
        "the results were made with other settings (saved by a run with {'model': 'runs/a'}): judge: (none) -> "
        "'guard'; max_new_tokens: 64 -> 8; model.sha256: sha256 aaaaaaaaaaaa... -> sha256 bbbbbbbbbbbb...; do X")
    path.write_text("{torn")
    with pytest.raises(ValueError, match="other settings: max_new_tokens: \\(none\\) -> 64"):
        fingerprint.check_key(path, key, what="the results", remedy="do X")
