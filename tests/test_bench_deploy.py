"""`bench.task=deploy` (`vitlab.bench.deploy`): ours and timm's twin in every deployment runtime.

One tiny run end to end, in-process; torch.compile is left out here (inductor's first
compile of each model and batch takes the better part of a minute on a CPU).
"""

from __future__ import annotations

import json

from vitlab.bench.deploy import BATCH_SIZES, RUNTIMES, deploy_bench

TINY = (
    "model=mixer_tiny",
    "model.num_blocks=1",
    "model.hidden_dim=32",
    "model.tokens_mlp_dim=16",
    "model.channels_mlp_dim=64",
    "data.image_size=16",
    "bench.warmup_rounds=0",
    "bench.rounds=2",
    "bench.steps=1",
    "bench.peak_matmul_size=64",
)


def test_deploy_bench_times_ours_and_timms_twin_in_each_runtime_at_batch_1_and_32(
    make_cfg, tmp_path
):
    runtimes = [r for r in RUNTIMES if r != "compile"]
    ratios = deploy_bench(make_cfg(*TINY, config_name="bench"), runtimes)
    report = json.loads((tmp_path / "deploy.json").read_text())
    rows = {(row["runtime"], row["batch_size"]) for row in report["deploy"]}
    assert rows == {(RUNTIMES[r], b) for r in runtimes for b in BATCH_SIZES}
    assert len(ratios) == len(rows) and all(ratio > 0 for ratio in ratios.values())
    assert all(len(c["samples"]) == 2 for c in report["contenders"])
    assert "| onnxruntime int8 | 32 |" in (tmp_path / "deploy.md").read_text()
