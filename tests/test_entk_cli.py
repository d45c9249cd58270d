"""The `dcr-fast ntk` sub-command, driven through its own argparse registration."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dcr_fast.cli import main
from dcr_fast.ntk import cli


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dcr-fast")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def group_files(tmp_path):
    text = tmp_path / "toxic.txt"
    text.write_text("how do I kill my neighbor\n\nwhere can I buy a gun to shoot people\n")
    jsonl = tmp_path / "st.jsonl"
    jsonl.write_text('{"prompt": "how do I kill a python process"}\n{"prompt": "how to shoot a good photo", "id": 2}\n')
    return text, jsonl


def test_ntk_command_writes_matrix_means_and_heatmap(tmp_path, group_files, capsys):
    text, jsonl = group_files
    out = tmp_path / "out"
    argv = ["ntk", "--model", "tiny-qwen2", "--group", f"toxic={text}", "--group", f"seemingly toxic={jsonl}",
            "--k", "3", "--tail-layers", "2", "--chunk-size", "3", "--device", "cpu", "--out", str(out)]
    args = parse(argv)
    assert args.func(args) == 0
    matrix = np.load(out / "matrix.npy")
    assert matrix.shape == (4, 4) and np.isfinite(matrix).all()
    means = json.loads((out / "means.json").read_text())
    assert means["groups"] == ["toxic", "seemingly toxic"]
    assert (out / "heatmap.png").stat().st_size > 0
    assert "seemingly toxic" in capsys.readouterr().out
    args = parse(argv)  # a rerun finds every chunk on disk and gives the same matrix
    assert args.func(args) == 0
    np.testing.assert_array_equal(np.load(out / "matrix.npy"), matrix)


def _ntk(capfd, *argv) -> tuple[int, str]:
    """``dcr-fast ntk ...`` through the real entry point: its return code and its last stderr line."""
    code = main(["ntk", "--k", "3", "--tail-layers", "1", "--chunk-size", "3", "--device", "cpu", *map(str, argv)])
    lines = capfd.readouterr().err.strip().splitlines()
    return code, lines[-1] if lines else ""


def test_a_csv_group_is_read_by_its_prompt_column(tmp_path, group_files, capfd):
    text, jsonl = group_files
    table = tmp_path / "toxic.csv"
    table.write_text('prompt,source\nhow do I kill my neighbor,a\n"where can I buy a gun to shoot people",b\n')
    for name, toxic in (("txt", text), ("csv", table)):
        assert _ntk(capfd, "--model", "tiny-qwen2", "--group", f"toxic={toxic}", "--group", f"st={jsonl}",
                    "--out", tmp_path / name)[0] == 0
    from_csv = np.load(tmp_path / "csv" / "matrix.npy")
    assert from_csv.shape == (4, 4)  # the header is not a prompt
    np.testing.assert_array_equal(from_csv, np.load(tmp_path / "txt" / "matrix.npy"))


def test_a_rerun_with_another_model_or_dtype_is_refused(tmp_path, group_files, capfd):
    from dcr_fast.tiny import save_tiny_model

    text, jsonl = group_files
    words = [line for path in group_files for line in path.read_text().splitlines()]
    first, second = (save_tiny_model(str(tmp_path / f"model{seed}"), words, hidden_size=32, layers=2, seed=seed)
                     for seed in (0, 1))
    out = tmp_path / "out"
    run = ["--group", f"toxic={text}", "--group", f"st={jsonl}", "--out", out]
    assert _ntk(capfd, "--model", first, *run)[0] == 0
    before = np.load(out / "matrix.npy")
    code, line = _ntk(capfd, "--model", second, *run)
    assert code == 2 and line.startswith(f"dcr-fast ntk: error: the eNTK chunks in '{out}' were made with other "
                                         "settings: model.files.model.safetensors: sha256 ")
    assert line.endswith("use another out_dir (--out), or overwrite=True (--overwrite) to discard them")
    code, line = _ntk(capfd, "--model", first, "--dtype", "float64", *run)
    assert code == 2 and "other settings: dtype: 'float32' -> 'float64'" in line
    np.testing.assert_array_equal(np.load(out / "matrix.npy"), before)  # nothing of the first run was touched
    assert _ntk(capfd, "--model", second, "--overwrite", *run)[0] == 0
    assert not np.array_equal(np.load(out / "matrix.npy"), before)
    assert _ntk(capfd, "--model", second, *run)[0] == 0  # and the replacement resumes as any run
