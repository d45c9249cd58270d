"""entk_matrix across gloo ranks: the ring plan, one process's matrix, resume after a killed rank.

The plan is checked as a pure function (every block once, by a rank that holds both chunks,
balanced, rebalanced on a rerun). The ranks' runs go through ``gloo_ranks``: 2 ranks compute
every method and dtype and must give one process's matrix; then 2 ranks are killed mid-run
(rank 1 dies after writing its first block) and 3 ranks finish the run, computing only the
missing blocks; one process then resumes it too.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from gloo_ranks import run_ranks
from test_entk_matrix import FLAT, GROUPS

from dcr_fast import distributed
from dcr_fast.ntk import sharded
from dcr_fast.ntk.matrix import entk_matrix
from dcr_fast.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # the ranks run one thread each: same sums

SMALL = {"toxic": GROUPS["toxic"][:1], "normal": GROUPS["normal"]}  # fd-reference goes pair by pair
# (name, groups, settings): every method, float64 and float32, offloaded features (sent over gloo).
RUNS = [
    ("exact", GROUPS, dict(chunk_size=2)),
    ("fd", GROUPS, dict(chunk_size=2, method="fd")),
    ("fd-reference", SMALL, dict(chunk_size=1, method="fd-reference")),
    ("exact-float32-offload", GROUPS, dict(chunk_size=3, dtype=torch.float32, offload_features=True, offload_group=1)),
]
SETTINGS = {"k": 3, "tail_layers": 2, "progress": False}


def build(dtype=torch.float64):
    tokenizer = tiny_tokenizer(FLAT)
    return tiny_model(tokenizer, dtype=dtype, layers=3, seed=3), tokenizer


def matrix(groups, *, dtype=torch.float64, **settings):
    model, tokenizer = build(dtype)
    return entk_matrix(model, tokenizer, groups, **SETTINGS, **settings)


# -- the plan -----------------------------------------------------------------------------------

def everything(n: int, symmetric: bool) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i if symmetric else 0, n)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_plan_computes_every_block_once_where_both_chunks_are(world, symmetric):
    n = 29
    plan = sharded.plan_ring(everything(n, symmetric), world, symmetric=symmetric)
    assigned = [b for blocks in plan.work.values() for b in blocks]
    assert sorted(assigned) == everything(n, symmetric)
    assert plan.steps == (world // 2 + 1 if symmetric else world)
    for (rank, step), blocks in plan.work.items():
        held = set(plan.chunks_of(rank)) | set(plan.chunks_of((rank - step) % world))
        for i, j in blocks:
            assert {i, j} <= held
            assert symmetric or plan.owner[i] == rank  # fd: the row's prefix cache stays home
    # A chunk is forwarded exactly as far as it is needed: rank r holds at step s what r - 1 sent at s - 1.
    for rank in range(world):
        for step in range(1, plan.steps):
            needed = {c for i, j in plan.work.get((rank, step), []) for c in (i, j)} - set(plan.chunks_of(rank))
            assert needed <= set(plan.sends((rank - 1) % world, step - 1))
    # Balanced up to the chunk granularity: 29 chunks on 8 ranks are 4 or 3 a rank.
    load = Counter(rank for (rank, _), blocks in plan.work.items() for _ in blocks)
    assert max(load.values()) <= len(assigned) / world * (1 + world / n), load
    # Each chunk travels to the ranks that need it: W/2 hops for the symmetric Gram, W - 1 for fd.
    assert sum(plan.sent_chunks(r) for r in range(world)) == n * (world // 2 if symmetric else world - 1)


def test_rerun_deals_a_dead_ranks_blocks_to_every_rank():
    n, world = 24, 4
    first = sharded.plan_ring(everything(n, True), world, symmetric=True)
    dead = [b for (rank, _), blocks in first.work.items() if rank == 2 for b in blocks]
    again = sharded.plan_ring(dead, world, symmetric=True)
    load = Counter(rank for (rank, _), blocks in again.work.items() for _ in blocks)
    assert sorted(b for blocks in again.work.values() for b in blocks) == sorted(dead)
    assert len(load) == world and max(load.values()) <= 0.4 * len(dead), load
    assert sharded.plan_ring([], world, symmetric=True).steps == 1


# -- on ranks -----------------------------------------------------------------------------------

def _compute_all(folder: str) -> None:
    results = {}
    for name, groups, settings in RUNS:
        result = matrix(groups, **settings)
        results[name] = (result.normalized, result.ranks)
    if distributed.is_main():
        torch.save(results, os.path.join(folder, "results.pt"))


def _die_after_first_block(out_dir: str, die: int) -> None:
    save = sharded._BlockStore.save

    def save_then_die(self, block, value):
        save(self, block, value)
        if distributed.rank() == die:
            os.kill(os.getpid(), signal.SIGKILL)

    sharded._BlockStore.save = save_then_die
    matrix(GROUPS, chunk_size=2, out_dir=out_dir)


def _resume(out_dir: str, folder: str) -> None:
    result, refused = matrix(GROUPS, chunk_size=2, out_dir=out_dir), None
    try:
        matrix(GROUPS, chunk_size=2, out_dir=out_dir, method="fd")
    except ValueError as err:  # every rank must get rank 0's refusal
        refused = str(err)
    torch.save((result.normalized, result.ranks, refused), os.path.join(folder, f"resumed{distributed.rank()}.pt"))


@pytest.fixture(scope="module")
def one_process():
    return {name: matrix(groups, **settings).normalized for name, groups, settings in RUNS}


def test_two_ranks_give_one_process_matrix(one_process, tmp_path):
    run_ranks(2, _compute_all, str(tmp_path))
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for name, groups, settings in RUNS:
        normalized, ranks = results[name]
        rtol = 1e-5 if settings.get("dtype") == torch.float32 else 1e-12
        np.testing.assert_allclose(normalized, one_process[name], rtol=rtol, err_msg=name)
        assert [r["rank"] for r in ranks] == [0, 1]
        n, size = sum(map(len, groups.values())), settings["chunk_size"]
        sizes = [min(size, n - start) for start in range(0, n, size)]
        symmetric = settings.get("method", "exact") == "exact"
        pairs = sum(a * b for i, a in enumerate(sizes) for j, b in enumerate(sizes) if j >= i or not symmetric)
        assert sum(r["pairs"] for r in ranks) == pairs, (name, ranks)
        assert all(r["blocks"] > 0 and r["sent_bytes"] > 0 for r in ranks), (name, ranks)
        assert list(ranks[0]["seconds"]) == list(sharded.PHASES)


def test_killed_rank_then_three_ranks_compute_only_the_missing_blocks(one_process, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(2, _die_after_first_block, str(out), 1)
    written = sorted(p.name for p in (out / "blocks").glob("b*.npy"))
    total = 10  # 7 prompts in chunks of 2: 4 chunks, 10 blocks i <= j
    assert 1 <= len(written) < total and not (out / "matrix.npy").exists()

    run_ranks(3, _resume, str(out), str(tmp_path))
    for rank in range(3):
        normalized, ranks, refused = torch.load(tmp_path / f"resumed{rank}.pt", weights_only=False)
        np.testing.assert_allclose(normalized, one_process["exact"], rtol=1e-12)
        assert "other settings" in refused
    assert sum(r["blocks"] for r in ranks) == total - len(written)  # only the missing ones
    assert sum(r["blocks_read_back"] for r in ranks) == len(written)
    assert len(list((out / "blocks").glob("b*.npy"))) == total
    assert json.loads((out / "ranks.json").read_text()) == ranks
    np.testing.assert_allclose(np.load(out / "matrix.npy"), one_process["exact"], rtol=1e-12)

    # One process resumes a run across ranks too: two blocks lost, two blocks computed.
    for name in written[:2]:
        (out / "blocks" / name).unlink()
    resumed = matrix(GROUPS, chunk_size=2, out_dir=out)
    assert resumed.ranks[0]["blocks"] == 2 and resumed.ranks[0]["world"] == 1
    np.testing.assert_allclose(resumed.normalized, one_process["exact"], rtol=1e-12)


def test_one_process_run_is_not_resumed_across_ranks(tmp_path):
    matrix(SMALL, chunk_size=1, out_dir=tmp_path)
    assert (tmp_path / "chunks").exists() and not sharded.has_blocks(tmp_path)
    with pytest.raises(ValueError, match="row chunks of a one-process run"):
        sharded._BlockStore(tmp_path, None, [], [], {}, overwrite=False)


def test_ntk_command_under_torchrun(tmp_path):
    """The real launcher: ``torchrun -m dcr_fast.cli ntk`` on 2 CPU ranks, rank 0 alone printing,
    the same matrix as the command in one process."""
    import subprocess
    import sys

    from dcr_fast.cli import main

    (tmp_path / "a.txt").write_text("\n".join(GROUPS["toxic"] + GROUPS["normal"]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(GROUPS["seemingly toxic"]) + "\n")
    argv = ["ntk", "--model", "tiny-qwen2", "--group", f"a={tmp_path / 'a.txt'}", "--group", f"b={tmp_path / 'b.txt'}",
            "--k", "3", "--tail-layers", "2", "--chunk-size", "2", "--device", "cpu"]
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dcr_fast.cli",
         *argv, "--out", str(tmp_path / "ranks")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("normalized eNTK means") == 1
    assert launched.stdout.count("work and seconds per rank") == 1
    ranks = json.loads((tmp_path / "ranks" / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["blocks"] > 0 for r in ranks)
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "ranks" / "matrix.npy"), np.load(tmp_path / "one" / "matrix.npy"),
                               rtol=1e-5)
