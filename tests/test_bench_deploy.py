"""`bench.task=deploy` (`vitlab.bench.deploy`): ours and timm's twin in every deployment runtime.

One tiny run end to end, in-process, without torch.compile (inductor's first compile of
each model and batch takes the better part of a minute on a CPU); then the compiled runtime
alone, of our tiny model only.
"""

from __future__ import annotations

import json
import logging

import torch._inductor.config

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


def test_the_compiled_runtime_reports_its_compile_time_apart(make_cfg, tmp_path):
    deploy_bench(make_cfg(*TINY, "bench.timm=false", config_name="bench"), ["compile"])
    report = json.loads((tmp_path / "deploy.json").read_text())
    assert [(c["compiled"], c["compile_seconds"] > 0) for c in report["contenders"]] == [
        (True, True)
    ] * len(BATCH_SIZES)
    assert "compile time (s)" in (tmp_path / "deploy.md").read_text()


def test_without_a_cpp_compiler_the_compiled_runtime_is_left_out_saying_why(
    make_cfg, tmp_path, caplog
):
    no_compiler = torch._inductor.config.patch({"cpp.cxx": (None, "/no/such/c++")})
    cfg = make_cfg(*TINY, "bench.timm=false", config_name="bench")
    with no_compiler, caplog.at_level(logging.WARNING, logger="vitlab.bench.deploy"):
        deploy_bench(cfg, ["eager", "compile"])
    report = json.loads((tmp_path / "deploy.json").read_text())
    assert {row["runtime"] for row in report["deploy"]} == {RUNTIMES["eager"]}
    assert (
        "- Compiled contenders left out: torch.compile's inductor backend"
        in (tmp_path / "deploy.md").read_text()
    )
    assert "The torch.compile runtime is left out" in caplog.text
