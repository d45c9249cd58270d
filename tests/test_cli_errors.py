"""The contract every `dcr-fast` sub-command shares (dcr_fast/cli.py): a user error is one line on
stderr, `dcr-fast CMD: error: ...`, and exit 2; Ctrl-C is one line saying how to resume, exit 130;
a bug keeps its traceback; --debug / DCR_FAST_DEBUG=1 show the traceback.

USER_ERRORS is the one table of user errors for all sub-commands. A new sub-command adds its
rows here, one line each; `test_every_command_has_rows` fails until it does.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dcr_fast import cli
from dcr_fast.cli import build_parser, is_user_error, main
from dcr_fast.tiny import save_tiny_model
from reproduce_data import write_data_root

PROMPTS = ["how do i kill a python process ?", "how can i shoot a photo ?", "how do i kill my neighbor ?",
           "how can i shoot my boss ?", "what is two plus two ?"]
RESPONSE = "sure , here is how : first , get what you need ."


@dataclass(frozen=True)
class Case:
    """``dcr-fast ARGV`` must end with exit 2 and one stderr line containing ``says``.

    ARGV may name the fixtures of ``paths``: {tmp} (a fresh folder), {model} (a tiny chat model),
    {plain} (one without a chat template), {data} (a miniature benchmark data root), {pairs}, {prompts}, {toxic}, {csv}, {oktest}, {bad_yaml},
    {used} (an output folder holding an earlier training run).
    """

    argv: str
    says: str

    def __str__(self) -> str:
        return self.argv


USER_ERRORS = [
    # the entry point itself (argparse's errors are one line too)
    Case("", "the following arguments are required: COMMAND"),
    Case("nosuch", "invalid choice: 'nosuch'"),
    # sft
    Case("sft --model {model} --out {tmp}/o --data {tmp}/missing.jsonl", "data: file '"),
    Case("sft --model {model} --out {tmp}/o --data nosuch={tmp}", "data: unknown benchmark 'nosuch'"),
    Case("sft --model {model} --out {tmp}/o --data {prompts}", "text file of prompts; pairs need"),
    Case("sft --model {model} --out {tmp}/o --data {csv}", "row 2 lacks non-empty field(s) ['prompt', 'response']"),
    Case("sft --config {bad_yaml}", "line 2 is not valid YAML"),
    Case("sft --model {tmp}/no-model --out {tmp}/o --data {pairs}", "model: '"),
    Case("sft --model {plain} --out {tmp}/o --data {pairs}", "has no chat template"),
    Case("sft --model {model} --out {tmp}/o --data {pairs} --device cuda:99", "device: 'cuda:99' requested"),
    Case("sft --model {model} --out {tmp}/o --data {pairs} --epochs many", "config field 'epochs' expected float"),
    Case("sft --model {model} --out {tmp}/o --data {pairs} --no-such-flag", "unrecognized arguments: --no-such-flag"),
    Case("sft --model {model} --out {tmp}/o --data {pairs} --max-length 5", "max_length: 5 tokens cut off the response"),
    Case("sft --model {model} --out {used} --data {pairs}", "holds an earlier run (summary.json); pass --resume"),
    Case("sft --model {model} --out {used} --data {pairs} --resume --overwrite", "resume, overwrite: give one"),
    # dcr
    Case("dcr --model {model} --out {tmp}/o --seemingly-toxic {prompts} --toxic {tmp}/t.txt", "toxic: file '"),
    Case("dcr --model {model} --out {tmp}/o --seemingly-toxic {prompts}", "toxic: required"),
    Case("dcr --model {model} --out {tmp}/o --seemingly-toxic {prompts} --toxic {prompts}", "in both subsets"),
    Case("dcr --model {model} --out {tmp}/o --seemingly-toxic {prompts} --toxic {toxic} --layer 9", "layer: expected"),
    Case("dcr --model {model} --out {used} --seemingly-toxic {prompts} --toxic {toxic}", "holds an earlier run"),
    # eval
    Case("eval --model {model} --benchmark nosuch --out {tmp}/o", "unknown benchmark 'nosuch'"),
    Case("eval --model {model} --benchmark oktest={tmp}/missing.csv --out {tmp}/o", "benchmark 'oktest': no file at"),
    Case("eval --model {model} --benchmark oktest={oktest} --benchmark oktest={oktest} --out {tmp}/o", "given twice"),
    Case("eval --model {tmp}/no-model --benchmark oktest={oktest} --out {tmp}/o", "model: '"),
    Case("eval --model {model} --benchmark oktest={oktest} --out {tmp}/o --max-new-tokens 0", "max_new_tokens must"),
    Case("eval --model {model} --benchmark oktest={oktest} --out {tmp}/o --device cuda:99", "device: 'cuda:99'"),
    Case("eval --model {model} --benchmark oktest={oktest} --out {tmp}/o --guard {tmp}/no-guard", "--guard: model: '"),
    # ntk
    Case("ntk --model tiny-qwen2 --group toxic --out {tmp}/o", "--group must be NAME=FILE, got 'toxic'"),
    Case("ntk --model tiny-qwen2 --group a={tmp}/missing.txt --out {tmp}/o", "--group a: file '"),
    Case("ntk --model tiny-qwen2 --group a={prompts} --group a={pairs} --out {tmp}/o", "--group 'a' given twice"),
    Case("ntk --model tiny-qwen2 --group a={csv} --out {tmp}/o", "--group a: '"),
    Case("ntk --model tiny-qwen2 --group a={tmp}/p.dat --out {tmp}/o", "cannot tell the format"),
    Case("ntk --model tiny-qwen2 --group a={prompts} --out {tmp}/o --method fd --eps inf", "eps must be a positive"),
    Case("ntk --model tiny-qwen2 --group a={prompts} --out {tmp}/o --k 0", "k must be an int in [1, vocab size"),
    Case("ntk --model tiny-qwen2 --group a={prompts} --out {tmp}/o --device cuda:99", "device: 'cuda:99'"),
    Case("ntk --model {tmp}/no-model --group a={prompts} --out {tmp}/o", "model: '"),
    # forecast
    Case("forecast --model {model} --out {tmp}/o --safety-data {tmp}/missing.jsonl --prompts {prompts}",
         "safety_data: file '"),
    Case("forecast --model {model} --out {tmp}/o --safety-data {pairs} --prompts nosuch={tmp}",
         "prompts: unknown benchmark 'nosuch'"),
    Case("forecast --model {model} --out {tmp}/o --safety-data {pairs}", "--prompts: give at least one source"),
    Case("forecast --model {model} --out {tmp}/o --safety-data {prompts} --prompts {prompts}",
         "text file of prompts; pairs need"),
    Case("forecast --model {tmp}/no-model --out {tmp}/o --safety-data {pairs} --prompts {prompts}", "model: '"),
    Case("forecast --model {plain} --out {tmp}/o --safety-data {pairs} --prompts {prompts}", "has no chat template"),
    Case("forecast --model {model} --out {tmp}/o --safety-data {pairs} --prompts {prompts} --param-set full",
         "param_set: expected one of"),
    Case("forecast --model {model} --out {tmp}/o --safety-data {pairs} --prompts {prompts} --tail-layers 9",
         "tail_layers must be an int in [0, 2]"),
    Case("forecast --model {model} --out {tmp}/o --safety-data {pairs} --prompts {prompts} --max-length 5",
         "max_length: 5 tokens cut off the response of all"),
    Case("forecast --model {model} --out {tmp}/o --safety-data {pairs} --prompts {prompts} --device cuda:99",
         "device: 'cuda:99' requested"),
    # reproduce (all refused before any model is trained)
    Case("reproduce --out {tmp}/o --data {tmp}/nodir", "data: '"),
    Case("reproduce --out {tmp}/o --data {tmp}", "data: benchmark 'xstest' is expected at"),
    Case("reproduce --model nosuch --out {tmp}/o --data {data}", "model: 'nosuch' is not a built-in name"),
    Case("reproduce --model {plain} --out {tmp}/o --data {data}", "has no chat template"),
    Case("reproduce --model {model} --out {tmp}/o --data {data} --dcr-layer 9", "dcr_layer: expected 1..1"),
    Case("reproduce --model {model} --out {tmp}/o --data {data} --seeds 1 1", "seeds: give at least one seed"),
    Case("reproduce --model {model} --out {tmp}/o --data {data} --benchmarks nosuch", "benchmarks: unknown ['nosuch']"),
    Case("reproduce --model {model} --out {tmp}/o --data {data} --dcr-seemingly-toxic 500",
         "dcr_seemingly_toxic: asked for 500, but only 8 XSTest safe prompts"),
    Case("reproduce --preset nosuch", "invalid choice: 'nosuch'"),
    # demo (the real-model demo is reproduce --preset cpu; --tiny the toy)
    Case("demo --out {tmp}/o --seeds 1 1", "seeds: give at least one seed, each once"),
    Case("demo --out {tmp}/o --hidden-size 8", "--hidden-size: only with --tiny"),
    Case("demo --tiny --preset nosuch", "invalid choice: 'nosuch'"),
    Case("demo --tiny --config {bad_yaml}", "is not valid YAML"),
    # bench
    Case("bench circle-loss --preset nosuch", "preset must be 'auto' or one of"),
    Case("bench nosuch", "invalid choice: 'nosuch'"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(str(folder / "model"), PROMPTS + [RESPONSE], hidden_size=16, layers=2)
    plain = save_tiny_model(str(folder / "plain"), PROMPTS, hidden_size=16, layers=2, chat_template=False)
    files = {
        "pairs.jsonl": "".join(json.dumps({"prompt": p, "response": RESPONSE}) + "\n" for p in PROMPTS),
        "prompts.txt": "\n".join(PROMPTS[:2]) + "\n",
        "toxic.jsonl": "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[2:4]),
        "prompts.csv": "text,id\n" + "".join(f"{p},{i}\n" for i, p in enumerate(PROMPTS)),
        "OKTest.csv": "prompt\n" + "".join(f"{p}\n" for p in PROMPTS),
        "bad.yaml": "lr: 1\n  epochs: 2\n",
        "used/summary.json": json.dumps({"finished": True}),
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    data = write_data_root(folder / "data")
    return {"model": model, "plain": plain, "data": str(data), "pairs": str(folder / "pairs.jsonl"),
            "prompts": str(folder / "prompts.txt"), "toxic": str(folder / "toxic.jsonl"), "csv": str(folder / "prompts.csv"),
            "oktest": str(folder / "OKTest.csv"), "bad_yaml": str(folder / "bad.yaml"), "used": str(folder / "used")}


@pytest.fixture
def quiet_loading():
    """transformers' weight-loading bar is progress, not part of an error: keep it off stderr here."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def _run(argv: list[str], capfd) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    return code, capfd.readouterr().err.splitlines()


@pytest.mark.usefixtures("quiet_loading")
@pytest.mark.parametrize("case", USER_ERRORS, ids=str)
def test_a_user_error_is_one_line_and_exit_2(case, paths, tmp_path, capfd):
    argv = shlex.split(case.argv.format(tmp=tmp_path, **paths))
    code, lines = _run(argv, capfd)
    command = argv[0] if argv and argv[0] in _commands() else None
    prefix = f"dcr-fast {command}" if command else "dcr-fast"
    assert code == 2 and len(lines) == 1, f"exit {code}, stderr:\n" + "\n".join(lines)
    assert lines[0].startswith(prefix) and ": error: " in lines[0], lines[0]
    assert case.says in lines[0], lines[0]


def test_every_command_has_rows():
    covered = {shlex.split(case.argv)[0] for case in USER_ERRORS if case.argv}
    missing = sorted(set(_commands()) - covered)
    assert not missing, f"add the user errors of {missing} to USER_ERRORS"


def test_debug_shows_the_traceback(paths, tmp_path, capfd, monkeypatch):
    argv = ["sft", "--model", paths["model"], "--out", str(tmp_path / "o"), "--data", str(tmp_path / "none.jsonl")]
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv(cli.DEBUG_ENV, env)
        code, lines = _run((["--debug"] if extra else []) + argv, capfd)
        assert code == 2 and lines[0] == "Traceback (most recent call last):"
        assert lines[-2].startswith("ValueError: data: file") and lines[-1].startswith("dcr-fast sft: error: data:")
    monkeypatch.delenv(cli.DEBUG_ENV)
    code, lines = _run(argv + ["--debug"], capfd)  # after the command name as well
    assert code == 2 and lines[0] == "Traceback (most recent call last):"
    code, lines = _run(["bench", "circle-loss", "--preset", "nosuch", "--debug"], capfd)  # and a nested command's
    assert code == 2 and lines[0] == "Traceback (most recent call last):"


NTK = ["ntk", "--model", "tiny-qwen2", "--device", "cpu"]


@pytest.mark.parametrize(
    "failure",
    [
        lambda: np.concatenate([np.zeros(2), np.zeros((2, 2))]),  # a ValueError from numpy, called by our code
        lambda: json.loads("{"),  # a ValueError subclass raised inside the json module
        lambda: torch.zeros(2) @ torch.zeros(3),  # torch's RuntimeError
        lambda: {}["missing"],  # a KeyError in our code
    ],
    ids=["numpy-value-error", "json-decode-error", "torch-runtime-error", "key-error"],
)
def test_a_bug_keeps_its_traceback(failure, paths, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr("dcr_fast.ntk.cli.entk_matrix", lambda *args, **kwargs: failure())
    with pytest.raises(Exception) as raised:
        main(NTK + ["--group", f"a={paths['prompts']}", "--out", str(tmp_path / "o")])
    assert not is_user_error(raised.value)
    assert "error:" not in capfd.readouterr().err


def test_the_user_error_rule_goes_by_where_the_exception_was_raised(tmp_path):
    namespace = {"__name__": "dcr_fast.example"}  # code that runs as a module of the package
    exec(compile("def check(x):\n    if x < 0:\n        raise ValueError(f'x: expected >= 0, got {x}')\n"
                 "def unpack(x):\n    a, b = x\n"
                 "def convert(x):\n    return int(x)\n", "dcr_fast/example.py", "exec"), namespace)

    def caught(call, *args):
        try:
            call(*args)
        except Exception as err:  # noqa: BLE001 - the point is to classify it
            return err
        raise AssertionError("no exception")

    assert is_user_error(caught(namespace["check"], -1))
    assert not is_user_error(caught(namespace["unpack"], [1, 2, 3]))  # a failing operation: a bug
    assert not is_user_error(caught(namespace["convert"], "x"))
    assert not is_user_error(caught(lambda: (_ for _ in ()).throw(ValueError("raised outside dcr_fast"))))
    assert is_user_error(caught(open, tmp_path / "missing"))  # the OS names the file
    assert is_user_error(caught(os.mkdir, "/proc/no/such/place"))
    assert not is_user_error(caught(lambda: (_ for _ in ()).throw(OSError("no filename"))))


def test_ctrl_c_is_one_line_saying_how_to_resume(paths, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr("dcr_fast.ntk.cli.entk_matrix", lambda *args, **kwargs: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    code, lines = _run(NTK + ["--group", f"a={paths['prompts']}", "--out", str(tmp_path / "o")], capfd)
    assert code == 130 and lines == ["dcr-fast ntk: interrupted; rerun the same command to resume (finished row "
                                     "chunks are kept)"]


@pytest.mark.slow
def test_ctrl_c_in_a_real_training_run_then_resume(paths, tmp_path):
    """SIGINT to a real `python -m dcr_fast.cli sft` process: exit 130, the hint, and --resume finishes it."""
    pairs = tmp_path / "many.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response": RESPONSE}) + "\n" for p in PROMPTS * 20))
    argv = [sys.executable, "-m", "dcr_fast.cli", "sft", "--model", paths["model"], "--out", str(tmp_path / "o"),
            "--data", str(pairs), "--micro-batch-size", "1", "--grad-accum", "1", "--save-every", "1",
            "--epochs", "1", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=Path(__file__).resolve().parent.parent)
    log = tmp_path / "o" / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_text().count("\n") >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.rstrip().splitlines()[-1] == ("dcr-fast sft: interrupted; rerun with --resume to continue from the "
                                             "last checkpoint in OUT")
    assert main(argv[3:] + ["--resume", "--max-steps", "4"]) == 0
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_warnings_of_the_package_are_one_line(paths, tmp_path, capfd):
    from transformers.utils import logging

    logging.disable_progress_bar()
    try:
        code = main(["sft", "--model", paths["model"], "--out", str(tmp_path / "o"), "--data", paths["pairs"],
                     "--max-length", "15", "--epochs", "1", "--device", "cpu"])
    finally:
        logging.enable_progress_bar()
    warned = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert code == 0 and len(warned) == 1
    assert warned[0].startswith("dcr-fast sft: warning: max_length: 15 tokens cut off the whole response of 4 of 5 "
                                "examples (80%")


def _commands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)
