"""`src/bench.py` / `vitlab.bench.race`: the race runs end to end and writes its table; no timings asserted.

The shared tiny run races the compiled contenders too: a real inductor compile on the CPU
(seconds with inductor's cache warm, the better part of a minute cold).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch._inductor.config
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from torch._dynamo.utils import counters

import vitlab.bench.race
from tests.conftest import compose_config
from vitlab.bench.race import BenchSettings, Racer, _compiled_copy, bench
from vitlab.bench.timm_models import timm_model
from vitlab.bench.token_merging import bench_token_merging
from vitlab.errors import ConfigError
from vitlab.models.kernel_choice import processor
from vitlab.runs.build import build_backbone, build_classifier
from vitlab.runs.validate import check_run

TINY = (
    "model=vit_tiny",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.mlp_dim=64",
    "data.image_size=16",
    "data.num_classes=10",
    "data.batch_size=4",
    "data.num_samples=16",
    "data.num_eval_samples=4",
    "bench.warmup_rounds=1",
    "bench.rounds=2",
    "bench.steps=1",
    "bench.peak_matmul_size=128",
)


EAGER_RATIOS = {
    "ours/timm train (bare loops)",
    "ours/timm infer",
    "Lightning fit / bare loop (ours)",
    "ours in Lightning fit / timm bare loop",
}
COMPILED_RATIOS = {"ours/timm train (compiled bare loops)", "ours/timm infer (compiled)"}
COMPILED_LOOPS = ("bare_compiled", "infer_compiled")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One benchmark of a tiny ViT (compiled contenders included), shared by the tests that
    read its output; also the graphs dynamo compiled while the rounds ran (none should)."""
    folder = tmp_path_factory.mktemp("bench")
    graphs_in_rounds = []
    real = vitlab.bench.race._race_in_one_fit

    def race_counting_graphs(*args):
        before = counters["stats"]["unique_graphs"]
        real(*args)
        graphs_in_rounds.append(counters["stats"]["unique_graphs"] - before)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vitlab.bench.race, "_race_in_one_fit", race_counting_graphs)
        ratios = bench(compose_config("bench", list(TINY), folder))
    yield folder, ratios, graphs_in_rounds
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def test_bench_writes_a_markdown_table_of_every_contender(tiny_run):
    folder, _, _ = tiny_run
    table = (folder / "bench.md").read_text()
    for row in (
        "| vitlab | Lightning fit |",
        "| vitlab | bare loop |",
        "| timm VisionTransformer | bare loop |",
        "| vitlab | inference |",
        "| timm VisionTransformer | inference |",
        "| vitlab | bare loop, compiled |",
        "| timm VisionTransformer | bare loop, compiled |",
        "| vitlab | inference, compiled |",
        "| timm VisionTransformer | inference, compiled |",
    ):
        assert row in table
    assert "Intel" in table or "cores" in table, "the machine is described"
    assert f"torch {torch.__version__}" in table


def test_bench_json_holds_every_round_and_the_medians(tiny_run):
    folder, _, _ = tiny_run
    report = json.loads((folder / "bench.json").read_text())
    assert len(report["contenders"]) == 9, "the fit, then 4 eager and 4 compiled contenders"
    for contender in report["contenders"]:
        assert len(contender["samples"]) == 2
        assert contender["images_per_sec"] > 0
        assert contender["flops_per_image"] > 0
        assert contender["mfu"] == pytest.approx(
            contender["images_per_sec"] * contender["flops_per_image"] / report["peak_flops"]
        )
    assert report["machine"]["cpu_cores"] >= 1
    # The CPU as the kernel cache keys it: model, x86 family and model, instruction sets.
    assert report["machine"]["cpu"] == processor()
    # One peak per measured round (the warm-up round's is left out), to pair with the samples.
    assert len(report["peak_flops_rounds"]) == 2
    assert 0 < max(report["peak_flops_rounds"]) <= report["peak_flops"]


def test_bench_reports_each_contenders_matmul_bound_mfu(tiny_run):
    folder, _, _ = tiny_run
    report = json.loads((folder / "bench.json").read_text())
    for contender in report["contenders"]:
        seconds, bound = contender["matmul_seconds_per_step"], contender["matmul_bound_mfu"]
        if contender["loop"] == "fit":  # the bare loop's step, inside Lightning
            assert seconds is None and bound is None
            continue
        assert seconds > 0, contender["description"]
        assert bound == pytest.approx(
            contender["flops_per_image"] * report["batch_size"] / seconds / report["peak_flops"]
        )
    table = (folder / "bench.md").read_text()
    assert "| MFU | matmul-bound |" in table
    assert "- Matmul-bound:" in table


def test_bench_returns_the_ratios_ours_over_timm_and_fit_over_bare(tiny_run):
    _, ratios, _ = tiny_run
    assert set(ratios) == EAGER_RATIOS | COMPILED_RATIOS
    assert all(value > 0 for value in ratios.values())


def test_compiled_contenders_report_their_compile_time_apart(tiny_run):
    folder, _, _ = tiny_run
    report = json.loads((folder / "bench.json").read_text())
    for contender in report["contenders"]:
        compiled = contender["loop"] in COMPILED_LOOPS
        assert contender["compiled"] is compiled
        if compiled:
            assert contender["compile_seconds"] > 0
        else:
            assert contender["compile_seconds"] is None
    table = (folder / "bench.md").read_text()
    compile_table = table.split("| model | loop | compile time (s) |")[1]
    assert "| vitlab | bare loop, compiled |" in compile_table
    assert "| timm VisionTransformer | inference, compiled |" in compile_table
    assert "| vitlab | bare loop |" not in compile_table, "eager contenders have no compile time"


def test_no_compile_happens_inside_the_timed_rounds(tiny_run):
    _, _, graphs_in_rounds = tiny_run
    assert graphs_in_rounds == [0], "a compile (or a recompile) ran inside the rounds"


def test_compiled_contenders_count_the_flops_and_parameters_of_their_eager_twins(tiny_run):
    folder, _, _ = tiny_run
    report = json.loads((folder / "bench.json").read_text())
    by_key = {(c["model"], c["loop"]): c for c in report["contenders"]}
    for model in ("vitlab", "timm"):
        for eager, compiled in (("bare", "bare_compiled"), ("infer", "infer_compiled")):
            for key in ("flops_per_image", "params"):
                assert by_key[model, compiled][key] == by_key[model, eager][key]
            assert by_key[model, compiled]["peak_memory_bytes"] > 0


def test_a_compiled_contender_is_a_copy_with_the_eager_weights(make_cfg):
    ours = build_backbone(make_cfg(*TINY, config_name="bench").model)
    twin = _compiled_copy(Racer("vitlab", "vitlab", ours, ours, False), ours)
    assert twin.compiled and twin.loops == COMPILED_LOOPS
    assert twin.model is not ours and twin.run_as is not twin.model
    for (name, mine), (_, copied) in zip(
        ours.state_dict().items(), twin.model.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, copied), name
        assert mine.data_ptr() != copied.data_ptr(), f"{name} is shared, not copied"


def test_compiled_false_races_the_five_contenders_of_before(make_cfg):
    cfg = make_cfg(*TINY, "bench.compiled=false", config_name="bench")
    ratios = bench(cfg)
    folder = Path(cfg.paths.output_dir)
    report = json.loads((folder / "bench.json").read_text())
    loops = [(c["model"], c["loop"]) for c in report["contenders"]]
    assert loops == [
        ("vitlab", "fit"),
        ("vitlab", "bare"),
        ("timm", "bare"),
        ("vitlab", "infer"),
        ("timm", "infer"),
    ]
    assert all(not c["compiled"] and c["compile_seconds"] is None for c in report["contenders"])
    assert set(ratios) == EAGER_RATIOS
    assert "compile time" not in (folder / "bench.md").read_text()


def test_without_a_cpp_compiler_the_compiled_contenders_are_left_out_saying_why(make_cfg, caplog):
    """`bench.compiled` is on by default: a machine without what Inductor builds CPU code
    with still gets its eager race, and the table says what is missing."""
    no_compiler = torch._inductor.config.patch({"cpp.cxx": (None, "/no/such/c++")})
    cfg = make_cfg(*TINY, config_name="bench")
    with no_compiler, caplog.at_level(logging.WARNING, logger="vitlab.bench.race"):
        ratios = bench(cfg)
    folder = Path(cfg.paths.output_dir)
    report = json.loads((folder / "bench.json").read_text())
    assert not any(c["compiled"] for c in report["contenders"])
    assert set(ratios) == EAGER_RATIOS
    assert (
        "- Compiled contenders left out: torch.compile's inductor backend builds CPU code"
        in (folder / "bench.md").read_text()
    )
    assert "The compiled contenders are left out" in caplog.text


def test_a_non_bool_compiled_is_refused_naming_the_key(make_cfg):
    cfg = make_cfg(*TINY, "bench.compiled=sometimes", config_name="bench")
    with pytest.raises(ConfigError, match=r"bench.compiled='sometimes' .*expected true or false"):
        check_run(cfg)


def test_bare_loop_peak_memory_is_measured_for_both_models(tiny_run):
    folder, _, _ = tiny_run
    report = json.loads((folder / "bench.json").read_text())
    memory = {(c["model"], c["loop"]): c["peak_memory_bytes"] for c in report["contenders"]}
    assert memory[("vitlab", "fit")] is None
    assert memory[("vitlab", "bare")] > 0
    assert memory[("timm", "bare")] > 0


@pytest.mark.parametrize(
    "model",
    ["vit_s16", "mixer_b16", "r26_vit_s32", "vit_s16_gap", "r_vit_ti16", "vit_tiny", "gmlp_s16"],
)
def test_timm_model_has_exactly_our_parameter_count(make_cfg, model):
    cfg = make_cfg(f"model={model}", config_name="bench")
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours = build_backbone(cfg.model)
        theirs, _ = timm_model(cfg.model)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())


def test_a_model_timm_lacks_is_refused_naming_the_key(make_cfg):
    cfg = make_cfg(*TINY, "model.pos_embed=rope2d", config_name="bench")
    with pytest.raises(ConfigError, match=r"model.pos_embed='rope2d'.*bench.timm=false"):
        bench(cfg)


def test_more_than_one_device_is_refused(make_cfg):
    cfg = make_cfg(*TINY, "trainer.devices=2", config_name="bench")
    with pytest.raises(ConfigError, match=r"trainer.devices=2.*one device"):
        bench(cfg)


def test_zero_rounds_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"bench.rounds=0 must be an integer >= 1"):
        BenchSettings(rounds=0)


def _recording_build_trainer(monkeypatch, limit_steps=None):
    """Patch `vitlab.bench.race.build_trainer` to keep the trainers it builds (optionally cut short)."""
    trainers = []
    real = vitlab.bench.race.build_trainer

    def build(cfg, **kwargs):
        trainer = real(cfg, **kwargs)
        if limit_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = limit_steps
        trainers.append(trainer)
        return trainer

    monkeypatch.setattr(vitlab.bench.race, "build_trainer", build)
    return trainers


def test_one_fit_runs_the_whole_race_and_its_first_step_is_untimed(make_cfg, monkeypatch):
    trainers = _recording_build_trainer(monkeypatch)
    cfg = make_cfg(
        *TINY,
        "bench.rounds=3",
        "bench.steps=2",
        "bench.timm=false",
        "bench.compiled=false",
        config_name="bench",
    )
    bench(cfg)
    report = json.loads((Path(cfg.paths.output_dir) / "bench.json").read_text())
    assert len(trainers) == 1, "one fit, not one per round"
    # 1 untimed step, then (1 warm-up + 3 measured rounds) x 2 steps
    assert trainers[0].global_step == 1 + (1 + 3) * 2
    for contender in report["contenders"]:
        assert len(contender["samples"]) == 3


def test_a_fit_that_stops_before_the_race_is_over_is_an_error(make_cfg, monkeypatch):
    _recording_build_trainer(monkeypatch, limit_steps=2)
    cfg = make_cfg(*TINY, "bench.timm=false", "bench.compiled=false", config_name="bench")
    with pytest.raises(RuntimeError, match=r"the fit stopped after 2 steps"):
        bench(cfg)


TOKEN_MERGING = (*TINY, "bench.task=token_merging", "bench.token_merging=[0,2,8]")


def test_token_merging_bench_measures_every_r_with_random_weights(make_cfg):
    cfg = make_cfg(*TOKEN_MERGING, config_name="bench")
    numbers = bench_token_merging(cfg)
    folder = Path(cfg.paths.output_dir)
    rows = json.loads((folder / "bench.json").read_text())["token_merging"]
    assert [row["tokens_per_block"] for row in rows] == [[17, 17], [17, 15], [17, 9]]
    assert all(row["images_per_sec"] > 0 and row["test_acc"] is None for row in rows)
    assert set(numbers) == {f"r={r}/images_per_sec" for r in (0, 2, 8)}
    assert "| 8 | 17 → 9 |" in (folder / "bench.md").read_text()


def test_token_merging_bench_tests_a_checkpoint_on_its_own_data(make_cfg, tmp_path):
    run = make_cfg(
        "data.image_size=8",
        "model.patch_size=4",
        "model.hidden_size=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.mlp_dim=32",
    )
    classifier = build_classifier(run, with_optimizer=False)
    path = tmp_path / "last.ckpt"
    torch.save(
        {"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, path
    )
    cfg = make_cfg(
        *TOKEN_MERGING, f"ckpt_path={path}", "bench.token_merging=[0,1]", config_name="bench"
    )
    numbers = bench_token_merging(cfg)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["input_shape"] == [1, 8, 8], "the checkpoint's data (digits), not the bench's"
    assert [row["tokens_per_block"] for row in report["token_merging"]] == [[5], [5]]
    assert 0.0 <= numbers["r=1/test_acc"] <= 1.0 and "r=0/test_acc" in numbers


def test_token_merging_bench_refuses_an_encoding_that_cannot_merge(make_cfg):
    cfg = make_cfg(*TOKEN_MERGING, "model.pos_embed=rope2d", config_name="bench")
    with pytest.raises(ConfigError, match=r"bench.token_merging=\[0, 2, 8\].*pos_embed='rope2d'"):
        bench_token_merging(cfg)


def test_token_merging_r_must_be_distinct_non_negative_integers():
    with pytest.raises(ConfigError, match=r"bench.token_merging=\[4, -1\] must be a list"):
        BenchSettings(token_merging=[4, -1])
