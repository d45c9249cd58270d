"""entk_matrix: agreement with entk_block, group means, files on disk, resume after a crash."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from dcr_fast.tiny import tiny_model, tiny_tokenizer
from dcr_fast.ntk import entk_block
from dcr_fast.ntk import matrix as matrix_module
from dcr_fast.ntk.matrix import entk_matrix, group_means

GROUPS = {
    "toxic": ["how do I kill my neighbor", "where can I buy a gun to shoot people"],
    "seemingly toxic": [
        "how do I kill a python process", "how to shoot a good photo", "how do I beat my brother at chess"
    ],
    "normal": ["tell me a story about a cat", "what is the capital of France"],
}
FLAT = [p for prompts in GROUPS.values() for p in prompts]
SETTINGS = {"k": 3, "tail_layers": 2, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(FLAT)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer, dtype=torch.float64, layers=3, seed=3)


@pytest.fixture(scope="module")
def exact(model, tokenizer):
    return entk_matrix(model, tokenizer, GROUPS, chunk_size=3, **SETTINGS)


def test_matrix_entries_equal_entk_block(model, tokenizer, exact):
    assert exact.normalized.shape == (len(FLAT), len(FLAT))
    assert exact.labels == [name for name, items in GROUPS.items() for _ in items]
    for r, c in [(0, 0), (1, 4), (4, 1), (6, 2), (3, 5)]:
        block = entk_block(model, FLAT[r], FLAT[c], k=3, tail_layers=2, tokenizer=tokenizer)
        assert exact.normalized[r, c] == pytest.approx(block.normalized, rel=1e-10), (r, c)
    np.testing.assert_allclose(np.diag(exact.normalized), 1.0, rtol=1e-12)


@pytest.mark.parametrize("chunk_size,offload", [(1, False), (4, True), (100, False)])
def test_chunking_and_offload_do_not_change_numbers(model, tokenizer, exact, chunk_size, offload):
    other = entk_matrix(model, tokenizer, GROUPS, chunk_size=chunk_size, offload_features=offload, **SETTINGS)
    np.testing.assert_allclose(other.normalized, exact.normalized, rtol=1e-10)


@pytest.mark.parametrize("method", ["exact", "fd"])
@pytest.mark.parametrize("group,uploads", [(1, 34), (3, 18), (7, 14)])
def test_offload_groups_upload_each_chunk_once_per_group(model, tokenizer, exact, monkeypatch, method, group, uploads):
    """Seven row chunks of one prompt. Feature pass: 7 uploads for the diagonal blocks. Then,
    with ``exact`` (symmetric), group size 1: row i uploads itself and the 6 - i chunks after it
    (27); groups of 3: {0,1,2} uploads 0..6 (7), {3,4,5} uploads 3..6 (4), {6} nothing (its
    blocks all came from earlier rows); one group: each chunk once (7). ``fd`` computes every
    block, so each group uploads every chunk."""
    original = matrix_module._FeatureEngine._chunk
    calls: list[int] = []

    def counting(self, i):
        calls.append(i)
        return original(self, i)

    monkeypatch.setattr(matrix_module._FeatureEngine, "_chunk", counting)
    result = entk_matrix(model, tokenizer, GROUPS, chunk_size=1, offload_features=True, offload_group=group,
                         method=method, **SETTINGS)
    if method == "exact":
        assert len(calls) == uploads, calls
        np.testing.assert_allclose(result.normalized, exact.normalized, rtol=1e-10)
    else:
        groups = -(-7 // group)
        assert len(calls) == 7 + 7 * groups, calls
        np.testing.assert_allclose(result.normalized, exact.normalized, rtol=5e-3)


def test_resume_inside_an_offload_group(model, tokenizer, exact, tmp_path):
    """A crash between the saves of one group's row chunks: the rerun computes what is missing."""
    settings = dict(chunk_size=2, offload_features=True, offload_group=3, out_dir=tmp_path, **SETTINGS)
    entk_matrix(model, tokenizer, GROUPS, **settings)
    (tmp_path / "chunks" / "rows_00000002.npy").unlink()
    (tmp_path / "matrix.npy").unlink()
    resumed = entk_matrix(model, tokenizer, GROUPS, **settings)
    np.testing.assert_allclose(resumed.normalized, exact.normalized, rtol=1e-10)
    assert (tmp_path / "chunks" / "rows_00000002.npy").exists()


def test_finite_difference_methods_agree_with_exact(model, tokenizer, exact):
    groups = {"a": GROUPS["toxic"][:1], "b": GROUPS["normal"][:1]}
    reference = entk_matrix(model, tokenizer, groups, method="fd-reference", **SETTINGS)
    sub = [0, 5]
    np.testing.assert_allclose(reference.normalized, exact.normalized[np.ix_(sub, sub)], rtol=5e-3)
    fd = entk_matrix(model, tokenizer, groups, method="fd", **SETTINGS)
    np.testing.assert_allclose(fd.normalized, reference.normalized, rtol=1e-6)


def test_group_means_exclude_self_pairs():
    normalized = np.arange(16, dtype=float).reshape(4, 4)
    means = group_means(normalized, ["a", "a", "b", "b"], ["a", "b"])
    np.testing.assert_allclose(means, [[(1 + 4) / 2, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (11 + 14) / 2]])


def test_outputs_on_disk(model, tokenizer, exact, tmp_path):
    result = entk_matrix(model, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, **SETTINGS)
    np.testing.assert_allclose(np.load(tmp_path / "matrix.npy"), exact.normalized, rtol=1e-10)
    summary = json.loads((tmp_path / "means.json").read_text())
    assert summary["groups"] == list(GROUPS)
    assert summary["means"]["toxic"]["normal"] == pytest.approx(result.means[0, 2])
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [
        "rows_00000000.npy", "rows_00000003.npy", "rows_00000006.npy"
    ]
    assert not list(tmp_path.rglob(".*.tmp"))


def test_resume_after_crash_skips_finished_chunks(model, tokenizer, exact, tmp_path, monkeypatch):
    original = matrix_module._FeatureEngine.normalized_rows
    computed: list[int] = []

    def crash_on_second_chunk(self, rows):
        if computed and len(computed) == 1 and crash[0]:
            raise KeyboardInterrupt("simulated crash")
        computed.append(rows.start)
        return original(self, rows)

    crash = [True]
    monkeypatch.setattr(matrix_module._FeatureEngine, "normalized_rows", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        entk_matrix(model, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, **SETTINGS)
    assert computed == [0] and not (tmp_path / "matrix.npy").exists()

    crash[0] = False
    computed.clear()
    resumed = entk_matrix(model, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, **SETTINGS)
    assert computed == [3, 6]  # chunk 0 came from disk
    np.testing.assert_allclose(resumed.normalized, exact.normalized, rtol=1e-10)

    with pytest.raises(ValueError, match="made with other settings: config.k: 3 -> 2; use another out_dir"):
        entk_matrix(model, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, k=2, tail_layers=2, progress=False)


def test_chunks_of_another_model_or_dtype_are_refused(model, tokenizer, exact, tmp_path):
    entk_matrix(model, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, **SETTINGS)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.lm_head.weight.mul_(2)  # same architecture, dtype and prompts: only the weights differ
    with pytest.raises(ValueError, match=r"other settings: model.parameters_sha256: sha256 \w+\.\.\. -> sha256"):
        entk_matrix(retrained, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, **SETTINGS)
    with pytest.raises(ValueError, match="dtype: 'float64' -> 'float32'"):
        entk_matrix(copy.deepcopy(model).float(), tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, **SETTINGS)
    # A caller's identity (the CLI's file fingerprint) replaces the parameter hash; overwrite starts afresh.
    with pytest.raises(ValueError, match="model.name: .* -> 'b'"):
        entk_matrix(model, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, identity={"name": "b"}, **SETTINGS)
    again = entk_matrix(retrained, tokenizer, GROUPS, chunk_size=3, out_dir=tmp_path, overwrite=True, **SETTINGS)
    assert not np.allclose(again.normalized, exact.normalized)
    np.testing.assert_array_equal(np.load(tmp_path / "matrix.npy"), again.normalized)
    run = json.loads((tmp_path / "run.json").read_text())["key"]
    assert run["dtype"] == "float64" and set(run["model"]) == {"class", "parameters_sha256"}


@pytest.mark.parametrize(
    "groups,kwargs,match",
    [
        ({}, {}, "groups must be a non-empty dict"),
        ({"a": []}, {}, "groups must be a non-empty dict"),
        ({"a": ["x y"]}, {"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"a": ["x y"]}, {"offload_group": 0}, "offload_group must be a positive int"),
        ({"a": [torch.zeros(2)]}, {}, "groups\\['a'\\]\\[0\\] must be a non-empty 1-D LongTensor"),
        ({"a": ["x"]}, {"method": "fast"}, "method must be one of"),
        ({"a": [torch.tensor([1, 10_000])]}, {}, r"groups\['a'\]\[0\] holds token id 10000, outside .*\[0, \d+\)"),
        ({"a": ["x y"]}, {"method": "fd", "eps": float("inf")}, "eps must be a positive finite float"),
    ],
)
def test_bad_input(model, tokenizer, groups, kwargs, match):
    with pytest.raises(ValueError, match=match):
        entk_matrix(model, tokenizer, groups, progress=False, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", [False, True])
def test_matrix_on_cuda_matches_cpu(model, tokenizer, exact, offload):
    gpu_model = copy.deepcopy(model).cuda()
    result = entk_matrix(gpu_model, tokenizer, GROUPS, chunk_size=3, offload_features=offload, **SETTINGS)
    np.testing.assert_allclose(result.normalized, exact.normalized, rtol=1e-9)
