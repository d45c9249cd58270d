"""bench/bench_entk.py runs end to end on a tiny case and records honest rows."""

from __future__ import annotations

import json

import pytest

from bench.bench_entk import EntkBenchConfig, resolve, run


def test_bench_records_every_method_with_extrapolated_reference(tmp_path):
    config = EntkBenchConfig(prompts=4, large_prompts=5, reference_pairs=1, vocab=64, hidden=32, layers=3,
                             heads=4, kv_heads=2, intermediate=48, results_dir=str(tmp_path))
    rows = run(config)
    by_impl = {r.impl: r for r in rows[:3]}
    assert set(by_impl) == {"exact", "fd", "fd-reference"}
    assert by_impl["fd-reference"].metrics["extrapolated_from_pairs"] == 1.0
    assert by_impl["exact"].metrics["max_rel_diff_vs_exact"] == 0.0
    assert by_impl["fd"].metrics["max_rel_diff_vs_exact"] < 5e-2  # float32 finite differences
    assert rows[3].case["N"] == 5 and rows[3].metrics["pairs_per_s"] > 0
    (path,) = tmp_path.glob("entk-*.json")
    saved = json.loads(path.read_text())["runs"][-1]
    assert saved["env"] and len(saved["rows"]) == 4


def test_presets_resolve_by_device():
    assert resolve(EntkBenchConfig(device="cuda")).hidden == 1536
    assert resolve(EntkBenchConfig(device="cpu", prompts=7)).prompts == 7
    with pytest.raises(ValueError, match="preset must be one of"):
        resolve(EntkBenchConfig(preset="huge"))


def test_scaling_bench_plans_the_ring_traffic():
    from bench.bench_entk_scaling import ScalingConfig, planned, resolve_scaling

    config = resolve_scaling(ScalingConfig(plan_prompts=64, chunk_size=4))
    assert config.worlds == (1, 2, 3) and config.preset == "cpu-tiny"
    assert resolve_scaling(ScalingConfig(device="cuda")).worlds == (1, 2, 4, 8)
    # 16 chunks on 4 ranks: each chunk goes W/2 = 2 hops, so a rank sends its 4 chunks twice.
    row = planned(config, 4, per_prompt=1e6)
    assert row.metrics["sent_mb_max"] == pytest.approx(4 * 2 * 4)
    assert row.metrics["sent_mb_total"] == pytest.approx(4 * 4 * 2 * 4)
    assert planned(config, 1, per_prompt=1e6).metrics["sent_mb_total"] == 0
