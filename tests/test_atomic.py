"""Atomic outputs: a failed write leaves the previous file (or directory) and no debris."""

import os
from pathlib import Path

import pytest

from dcr_fast import atomic


def test_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert os.listdir(path.parent) == ["out.json"]


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    atomic.write_text(path, "old")

    def crash(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic.write(path, crash)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_directory_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "model"
    with atomic.directory(target) as tmp:
        (tmp_path / "model.tmp" / "w.bin").write_text("v1")
        assert tmp == str(tmp_path / "model.tmp") and not target.exists()
    with pytest.raises(RuntimeError):
        with atomic.directory(target) as tmp:
            (tmp_path / "model.tmp" / "w.bin").write_text("v2")
            raise RuntimeError("crash")
    assert (target / "w.bin").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_follow_the_umask_as_ordinary_files_do(tmp_path, umask):
    before = os.umask(umask)
    try:
        (tmp_path / "ordinary").write_text("x")
        atomic.write_text(tmp_path / "atomic", "x")
        atomic.write(tmp_path / "by-writer.npy", lambda tmp: open(tmp, "wb").close(), suffix=".npy")
        with atomic.directory(tmp_path / "folder") as tmp:
            (Path(tmp) / "f").write_text("x")
        os.mkdir(tmp_path / "ordinary-folder")
    finally:
        os.umask(before)

    def mode(name):
        return oct((tmp_path / name).stat().st_mode & 0o777)

    assert mode("atomic") == mode("by-writer.npy") == mode("ordinary") == oct(0o666 & ~umask)
    assert mode("folder") == mode("ordinary-folder") == oct(0o777 & ~umask)


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "report.json"
    atomic.write_json(path, {"a": 1})
    os.chmod(path, 0o640)
    atomic.write_json(path, {"a": 2})
    assert path.stat().st_mode & 0o777 == 0o640 and "2" in path.read_text()


def test_append_line_cuts_off_a_line_left_incomplete(tmp_path):
    path = tmp_path / "log.jsonl"
    atomic.append_line(path, '{"step": 1}')
    with open(path, "a") as handle:
        handle.write('{"step": 2, "lo')  # a kill during the second append
    atomic.append_line(path, '{"step": 2}')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text("x" * 70_000)  # a fragment longer than one read block, and no newline at all
    atomic.append_line(path, "a")
    assert path.read_text() == "a\n"
    with pytest.raises(ValueError, match="must not contain a newline"):
        atomic.append_line(path, "a\nb")
