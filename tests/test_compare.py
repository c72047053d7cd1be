"""`src/compare.py` and `vitlab.reports` on sweep folders written by hand, as the pipeline writes them."""

from __future__ import annotations

import csv
import importlib.util
import io
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from nbclient import NotebookClient
from rich.console import Console

from tests.conftest import wait_until_wandb_run_is_written
from vitlab import reports

ROOT = Path(__file__).resolve().parents[1]
PATCH_SIZES = (4, 8)
POS_EMBEDS = ("learned", "sincos2d")
PRECISIONS = ("32-true", "bf16-mixed")
GRID = list(itertools.product(PATCH_SIZES, POS_EMBEDS, PRECISIONS))
FAILED_JOB = 5
FAILURE = "NonFiniteLossError: the training loss became nan at step 7"
VARIED = ["model.patch_size", "model.pos_embed", "trainer.precision"]
PLOTS = (
    "val_acc_curves.png",
    "acc_vs_patch_size.png",
    "acc_vs_throughput.png",
    "throughput_vs_patch_size.png",
)
CSV_COLUMNS = [
    "epoch", "step", "lr-AdamW/pg1", "train/loss_step", "val/acc", "val/loss",
    "train/loss_epoch", "train/acc", "train/samples_per_sec", "test/acc",
]  # fmt: skip


def final_val_acc(patch_size: int, pos_embed: str, precision: str) -> float:
    """Distinct for every grid point: smaller patches, learned positions and fp32 score higher."""
    return round(
        0.95
        - 0.05 * (patch_size == 8)
        - 0.02 * (pos_embed == "sincos2d")
        - 0.01 * (precision == "bf16-mixed"),
        4,
    )


def run_config(patch_size: int, pos_embed: str, precision: str) -> dict:
    return {
        "task_name": "train",
        "optimized_metric": "val/acc",
        "data": {"image_size": 8, "num_classes": 10},
        "model": {
            "_target_": "vitlab.models.VisionTransformer",
            "image_size": "${data.image_size}",
            "patch_size": patch_size,
            "pos_embed": pos_embed,
        },
        "trainer": {"precision": precision, "max_epochs": 3},
        "paths": {"output_dir": "${hydra:runtime.output_dir}"},
    }


def write_job(job: Path, patch_size: int, pos_embed: str, precision: str, failed: bool) -> None:
    """One job folder: .hydra/, csv/metrics.csv (sparse rows), metrics.json, status.json."""
    overrides = [
        "sweep=patch_pos_precision",
        f"model.patch_size={patch_size}",
        f"model.pos_embed={pos_embed}",
        f"trainer.precision={precision}",
        "trainer.max_epochs=3",
    ]
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump(run_config(patch_size, pos_embed, precision))
    )
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "MULTIRUN"}}))

    acc = final_val_acc(patch_size, pos_embed, precision)
    speed = 1000.0 / patch_size + (200.0 if precision == "bf16-mixed" else 0.0)
    epochs = 1 if failed else 3
    rows = []
    for epoch in range(epochs):
        step = 10 * (epoch + 1) - 1
        rows.append({"step": step, "lr-AdamW/pg1": 1e-3})
        rows.append({"epoch": epoch, "step": step, "train/loss_step": 2.0 - 0.5 * epoch})
        rows.append(
            {"epoch": epoch, "step": step, "val/acc": acc - 0.1 * (2 - epoch), "val/loss": 1.0}
        )
        rows.append(
            {"epoch": epoch, "step": step, "train/loss_epoch": 1.5 - 0.4 * epoch,
             "train/acc": acc, "train/samples_per_sec": speed}
        )  # fmt: skip
    if not failed:
        rows.append({"epoch": 3, "step": 30, "test/acc": acc - 0.01})
    (job / "csv").mkdir()
    with (job / "csv" / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    if not failed:
        metrics = {
            "val/acc": acc,
            "test/acc": acc - 0.01,
            "train/loss": 0.7,
            "train/samples_per_sec": speed,
        }
        (job / "metrics.json").write_text(json.dumps(metrics))
    status = {
        "status": "failed" if failed else "completed",
        "error": FAILURE if failed else None,
        "overrides": overrides,
    }
    (job / "status.json").write_text(json.dumps(status))


def write_sweep(sweep: Path) -> Path:
    """A 2 x 2 x 2 multirun folder (patch size x position encoding x precision), job 5 failed."""
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "MULTIRUN"}}))
    for number, point in enumerate(GRID):
        write_job(sweep / str(number), *point, failed=number == FAILED_JOB)
    return sweep


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return write_sweep(tmp_path / "multiruns" / "2026-11-22_03-40-00")


EVAL_PATCH_SIZES = (2, 4, 8)
CKPT = "logs/train/runs/2026-11-22_03-40-00/checkpoints/last.ckpt"


def eval_acc(patch_size: int) -> float:
    """One checkpoint trained at patch 4: best at its own size."""
    return {2: 0.91, 4: 0.97, 8: 0.88}[patch_size]


def eval_speed(patch_size: int) -> float:
    return 100.0 * patch_size**2


def write_eval_job(job: Path, overrides: list[str], metrics: dict[str, float]) -> None:
    """One job of `src/eval.py -m`: the model node holds only what the command line added."""
    added = reports.parse_overrides(overrides)
    config = {
        "task_name": "eval",
        "ckpt_path": CKPT,
        "model": {
            key.removeprefix("model."): yaml.safe_load(value)
            for key, value in added.items()
            if key.startswith("model.")
        },
        "trainer": {"precision": "32-true"},
        "callbacks": {"throughput": {"_target_": "vitlab.training.callbacks.ImageThroughput"}},
    }
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.json").write_text(json.dumps(metrics))
    status = {"status": "completed", "error": None, "overrides": overrides}
    (job / "status.json").write_text(json.dumps(status))


@pytest.fixture
def eval_sweep(tmp_path: Path) -> Path:
    """`src/eval.py -m ckpt_path=... +model.patch_size=2,4,8`, as the pipeline leaves it."""
    sweep = tmp_path / "eval" / "multiruns" / "2026-11-22_04-00-00"
    for number, patch_size in enumerate(EVAL_PATCH_SIZES):
        metrics = {
            "test/acc": eval_acc(patch_size),
            "test/loss": 0.3,
            "test/samples_per_sec": eval_speed(patch_size),
            "test/mfu": 0.01,
        }
        overrides = [f"ckpt_path={CKPT}", f"+model.patch_size={patch_size}"]
        write_eval_job(sweep / str(number), overrides, metrics)
    return sweep


def run_compare(*args: str | Path) -> int:
    """`src/compare.py`'s `main(args)`, in-process."""
    spec = importlib.util.spec_from_file_location("compare", ROOT / "src" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(arg) for arg in args])


@pytest.fixture
def wandb(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The `wandb` module, offline and quiet: runs are written under `wandb.init(dir=...)`."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    import wandb

    return wandb


def compare(*args: str | Path) -> subprocess.CompletedProcess:
    """`python src/compare.py args...`, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "compare.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )


def test_compare_writes_the_table_and_plots_into_the_multirun_folder(sweep):
    result = compare(sweep)
    assert result.returncode == 0, result.stderr
    assert "Runs by val/acc" in result.stdout and FAILURE in result.stdout
    for name in ("compare.md", "compare.csv", *PLOTS):
        assert (sweep / name).stat().st_size > 0, name
    assert not (sweep / "compare_mean.md").exists()  # no seed or fold varied
    with (sweep / "compare.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8
    markdown = (sweep / "compare.md").read_text().splitlines()
    assert len(markdown) == 2 + 8 and "| job | model.patch_size |" in markdown[0]


def test_every_job_is_read_the_failed_one_included(sweep):
    runs = reports.load_runs([sweep])
    assert [run.name for run in runs] == [str(n) for n in range(8)]
    failed = runs[FAILED_JOB]
    assert failed.status == "failed" and failed.error == FAILURE
    assert failed.metrics == {}
    assert len(failed.curve("val/acc")) == 1  # its partial history is still there to plot


def test_varied_keys_are_exactly_the_three_grid_axes(sweep):
    assert reports.varied_keys(reports.load_runs([sweep])) == VARIED


def test_rows_are_sorted_by_the_optimized_metric_failed_job_last(sweep):
    runs = reports.load_runs([sweep])
    metric = reports.optimized_metric(runs)
    table = reports.comparison_table(reports.sort_runs(runs, metric), VARIED, metric)
    accs = [row["val/acc"] for row in table.rows]
    assert metric == "val/acc"
    assert accs[:-1] == sorted(accs[:-1], reverse=True) and accs[0] == 0.95
    assert table.rows[-1]["job"] == str(FAILED_JOB) and table.rows[-1]["status"] == "failed"
    assert accs[-1] is None and table.rows[-1]["error"] == FAILURE
    assert table.columns[:5] == ["job", *VARIED, "status"]
    assert {"test/acc", "train/loss", "train/samples_per_sec"} <= set(table.columns)


def test_a_loss_metric_sorts_ascending(sweep):
    runs = reports.load_runs([sweep])
    for number, run in enumerate(runs):
        if not run.failed:
            run.metrics["val/loss"] = float(number % 3)
    ordered = [run.metrics.get("val/loss") for run in reports.sort_runs(runs, "val/loss")]
    assert ordered[:-1] == sorted(ordered[:-1]) and ordered[-1] is None


def test_config_interpolations_are_resolved_where_they_can_be(sweep):
    run = reports.load_run(sweep / "0")
    assert run.config["model.image_size"] == 8
    assert run.config["paths.output_dir"] == "${hydra:runtime.output_dir}"


def test_run_folders_given_directly_are_compared_into_out(sweep, tmp_path):
    out = tmp_path / "report"
    result = compare(sweep / "0", sweep / "6", "--out", out)
    assert result.returncode == 0, result.stderr
    with (out / "compare.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["job"] for row in rows] == ["0", "6"]
    assert list(rows[0])[:4] == ["job", "model.patch_size", "model.pos_embed", "status"]
    assert all((out / name).stat().st_size > 0 for name in PLOTS)


def test_one_run_folder_writes_into_itself(sweep):
    result = compare(sweep / "3", "--metric", "test/acc")
    assert result.returncode == 0, result.stderr
    assert "Runs by test/acc" in result.stdout
    assert (sweep / "3" / "compare.md").is_file()


def test_plots_are_drawn_when_no_key_varies(sweep):
    runs = [reports.load_run(sweep / "0")]
    fig = reports.plot_metric_vs_patch_size(runs, "val/acc")
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 1


def test_patch_size_plot_has_a_facet_per_precision_and_a_line_per_pos_embed(sweep):
    fig = reports.plot_metric_vs_patch_size(reports.load_runs([sweep]), "val/acc")
    assert [ax.get_title() for ax in fig.axes] == [
        "trainer.precision=32-true",
        "trainer.precision=bf16-mixed",
    ]
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]


def test_an_empty_folder_exits_nonzero_with_a_message(tmp_path):
    result = compare(tmp_path)
    assert result.returncode != 0
    assert "No runs in" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_folder_exits_nonzero_with_a_message(tmp_path):
    result = compare(tmp_path / "nope")
    assert result.returncode != 0 and "No such folder" in result.stderr


@pytest.mark.parametrize("shape", ["pipeline", "plain"])
def test_a_wandb_only_job_is_read_from_its_offline_run_file(tmp_path, wandb, shape):
    """Both config shapes: the pipeline's (the run config under `config`, as the classifier's
    hyperparameter; the overrides as tags) and a config given to `wandb.init` directly."""
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    overrides = ["model.patch_size=8", "model.pos_embed=sincos2d"]
    config = run_config(8, "sincos2d", "bf16-mixed")
    run = wandb.init(
        dir=job,
        project="vitlab",
        group="patch_pos_precision_2026-11-22_03-40-00",
        name=",".join(overrides),
        tags=["dev", *overrides],
        config={"num_classes": 10, "config": config} if shape == "pipeline" else config,
    )
    for epoch, acc in enumerate((0.5, 0.7, 0.8)):
        wandb.log({"val/acc": acc, "epoch": epoch, "trainer/global_step": 10 * epoch + 9})
    wandb.log({"train/samples_per_sec": 640.0, "test/acc": 0.78})
    run.finish()
    [path] = job.glob("wandb/offline-run-*/run-*.wandb")
    wait_until_wandb_run_is_written(path)

    [loaded] = reports.load_runs([job.parent])
    assert loaded.status == "completed"
    assert loaded.metrics["val/acc"] == 0.8 and loaded.metrics["test/acc"] == 0.78
    assert loaded.metrics["train/samples_per_sec"] == 640.0
    assert [row["val/acc"] for row in loaded.curve("val/acc")] == [0.5, 0.7, 0.8]
    assert [row["step"] for row in loaded.curve("val/acc")] == [9, 19, 29]
    assert loaded.config["model.patch_size"] == 8
    assert loaded.config["trainer.precision"] == "bf16-mixed"
    assert loaded.overrides == {"model.patch_size": "8", "model.pos_embed": "sincos2d"}


def test_wandb_reader_stops_at_a_truncated_record(tmp_path, wandb):
    run = wandb.init(dir=tmp_path, project="vitlab")
    for step in range(3000):  # several 32 KiB blocks
        wandb.log({"val/acc": step / 3000})
    run.finish()
    [path] = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    wait_until_wandb_run_is_written(path)
    assert path.stat().st_size > 2 * 32 * 1024
    whole = reports.read_wandb_run(path)
    assert [row["val/acc"] for row in whole.history] == [step / 3000 for step in range(3000)]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    half = reports.read_wandb_run(path)
    assert 0 < len(half.history) < 3000 and half.exit_code is None


def test_the_notebook_runs_on_a_sweep_given_by_the_environment(sweep, monkeypatch):
    monkeypatch.setenv("VITLAB_SWEEP_DIR", str(sweep))
    notebook = nbformat.read(ROOT / "notebooks" / "compare_sweep.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells), "store it without outputs"
    client = NotebookClient(
        notebook,
        timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": ROOT / "notebooks"}},
    )
    client.execute()
    assert all((sweep / name).stat().st_size > 0 for name in ("compare.md", *PLOTS))
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == len(PLOTS)


def test_an_eval_sweep_over_patch_size_is_ranked_by_test_acc_with_its_test_throughput(
    eval_sweep, capsys
):
    assert run_compare(eval_sweep) == 0
    assert "Runs by test/acc" in capsys.readouterr().out
    with (eval_sweep / "compare.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == [
        "job", "model.patch_size", "status", "test/acc", "test/loss", "test/samples_per_sec",
    ]  # fmt: skip
    assert [row["model.patch_size"] for row in rows] == ["4", "2", "8"]
    assert [float(row["test/samples_per_sec"]) for row in rows] == [1600.0, 400.0, 6400.0]
    for name in ("compare.md", "compare.csv", *PLOTS):
        assert (eval_sweep / name).stat().st_size > 0, name


def test_an_eval_sweep_plots_test_acc_and_test_throughput_against_patch_size(eval_sweep):
    runs = reports.load_runs([eval_sweep])
    [acc] = reports.plot_metric_vs_patch_size(runs, reports.optimized_metric(runs)).axes
    [speed] = reports.plot_throughput_vs_patch_size(runs).axes
    assert acc.get_ylabel() == "test/acc"
    assert speed.get_ylabel() == "test/samples_per_sec (images/s)"
    [acc_line], [speed_line] = acc.lines, speed.lines
    assert list(acc_line.get_xdata()) == list(speed_line.get_xdata()) == [2, 4, 8]
    assert list(acc_line.get_ydata()) == [eval_acc(p) for p in EVAL_PATCH_SIZES]
    assert list(speed_line.get_ydata()) == [eval_speed(p) for p in EVAL_PATCH_SIZES]


def test_a_training_sweep_plots_its_training_throughput_against_patch_size(sweep):
    fig = reports.plot_throughput_vs_patch_size(reports.load_runs([sweep]))
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]  # a panel per precision, a line per pos
    assert fig.axes[0].get_ylabel() == "train/samples_per_sec (images/s)"
    fp32_learned = fig.axes[0].lines[0]
    assert list(fp32_learned.get_xdata()) == list(PATCH_SIZES)
    assert list(fp32_learned.get_ydata()) == [1000.0 / p for p in PATCH_SIZES]


@pytest.mark.parametrize(
    ("key", "values"),
    [
        ("model.token_merging", ["0", "4", "8"]),
        ("model.patch_dropout", ["0.0", "0.5"]),
        ("model.flexi_patch_sizes", ["[2,4,8]", "null"]),
    ],
)
def test_a_dynamic_patch_key_swept_is_a_column_like_any_other(tmp_path, key, values):
    sweep = tmp_path / "multiruns" / "2026-11-22_05-00-00"
    for number, value in enumerate(values):
        overrides = [f"ckpt_path={CKPT}", "+model.patch_size=4", f"+{key}={value}"]
        write_eval_job(sweep / str(number), overrides, {"test/acc": 0.9 - 0.01 * number})
    runs = reports.load_runs([sweep])
    assert reports.varied_keys(runs) == [key]
    table = reports.comparison_table(runs, [key], "test/acc")
    assert table.columns[:3] == ["job", key, "status"]
    assert [row[key] for row in table.rows] == values


# ----------------------------------------------------------------------------- repeats


def write_train_job(job: Path, overrides: list[str], metrics: dict[str, float] | None) -> None:
    """A training job as the reader needs it: `.hydra/` and `status.json`, and `metrics.json`
    unless `metrics` is None (the job failed)."""
    config = {
        "task_name": "train",
        "optimized_metric": "val/acc",
        "trainer": {"precision": "32-true"},
    }
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    status = {
        "status": "failed" if metrics is None else "completed",
        "error": FAILURE if metrics is None else None,
        "overrides": overrides,
    }
    (job / "status.json").write_text(json.dumps(status))


THROUGHPUT = "train/samples_per_sec"
# model.patch_size -> val/acc by seed (None: the job failed); the worse group is written first.
SEEDED = {8: (0.90, 0.92, None), 4: (0.97, 0.975, 0.98)}


@pytest.fixture
def seed_sweep(tmp_path: Path) -> Path:
    """`model.patch_size=8,4 seed=1,2,3`: six jobs, the third seed of patch 8 failed."""
    sweep = tmp_path / "multiruns" / "2026-11-22_06-00-00"
    jobs = ((p, s, acc) for p, accs in SEEDED.items() for s, acc in enumerate(accs, start=1))
    for number, (patch_size, seed, acc) in enumerate(jobs):
        metrics = None if acc is None else {"val/acc": acc, THROUGHPUT: 1000 / patch_size + seed}
        write_train_job(
            sweep / str(number), [f"model.patch_size={patch_size}", f"seed={seed}"], metrics
        )
    return sweep


def test_jobs_that_differ_only_in_seed_are_one_row_of_mean_std_and_n(seed_sweep):
    table = reports.mean_table(reports.load_runs([seed_sweep]), "val/acc")
    assert table.columns == ["jobs", "model.patch_size", "n", "val/acc", THROUGHPUT]
    by_patch = {row["model.patch_size"]: row for row in table.rows}
    assert by_patch["4"]["jobs"] == "3,4,5" and by_patch["4"]["n"] == 3
    assert by_patch["4"]["val/acc"].mean == pytest.approx(0.975)
    assert by_patch["4"]["val/acc"].std == pytest.approx(0.005)  # sample std (ddof=1)
    assert by_patch["8"]["n"] == 2  # the failed seed does not count
    assert by_patch["8"]["val/acc"].std == pytest.approx(0.02 / 2**0.5)


def test_groups_are_sorted_by_their_mean_best_first(seed_sweep):
    table = reports.mean_table(reports.load_runs([seed_sweep]), "val/acc")
    assert [row["model.patch_size"] for row in table.rows] == ["4", "8"]


def test_a_run_without_the_metric_counts_only_in_the_cells_it_has(seed_sweep):
    (seed_sweep / "0" / "metrics.json").write_text(json.dumps({THROUGHPUT: 126.0}))
    table = reports.mean_table(reports.load_runs([seed_sweep]), "val/acc")
    row = next(row for row in table.rows if row["model.patch_size"] == "8")
    assert row["n"] == row["val/acc"].n == 1 and row[THROUGHPUT].n == 2
    assert reports.cell_text(row, "val/acc") == "0.9200"  # one run: no std
    assert reports.cell_text(row, THROUGHPUT) == "126.5 ± 0.7 (n=2)"


def test_data_fold_groups_like_seed(tmp_path):
    sweep = tmp_path / "multiruns" / "2026-11-22_07-00-00"
    for number, (lr, fold) in enumerate(itertools.product(("0.1", "0.01"), range(3))):
        overrides = [f"optimizer.lr={lr}", f"data.fold={fold}"]
        write_train_job(sweep / str(number), overrides, {"val/acc": 0.8 + 0.01 * fold})
    table = reports.mean_table(reports.load_runs([sweep]), "val/acc")
    assert [(row["optimizer.lr"], row["n"]) for row in table.rows] == [("0.1", 3), ("0.01", 3)]


def test_a_sweep_without_seed_or_fold_has_no_mean_table(sweep):
    assert reports.mean_table(reports.load_runs([sweep]), "val/acc") is None


def test_compare_prints_and_writes_the_mean_table_of_a_seed_sweep(seed_sweep, capsys):
    assert run_compare(seed_sweep) == 0
    assert "Mean ± std over seed, by val/acc" in capsys.readouterr().out
    with (seed_sweep / "compare_mean.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0])[:6] == [
        "jobs", "model.patch_size", "n", "val/acc_mean", "val/acc_std", "val/acc_n",
    ]  # fmt: skip
    assert [row["val/acc_n"] for row in rows] == ["3", "2"]
    assert "| 3,4,5 | 4 | 3 | 0.9750 ± 0.0050 |" in (seed_sweep / "compare_mean.md").read_text()
    assert len((seed_sweep / "compare.csv").read_text().splitlines()) == 1 + 6  # every job


def test_a_group_of_one_run_has_a_blank_std_in_the_csv(tmp_path):
    sweep = tmp_path / "multiruns" / "2026-11-22_08-00-00"
    for number, (patch_size, seed) in enumerate(((4, 1), (4, 2), (8, 1))):
        overrides = [f"model.patch_size={patch_size}", f"seed={seed}"]
        write_train_job(sweep / str(number), overrides, {"val/acc": 0.9})
    table = reports.mean_table(reports.load_runs([sweep]), "val/acc")
    reports.write_csv(table, tmp_path / "mean.csv")
    with (tmp_path / "mean.csv").open() as file:
        rows = {row["model.patch_size"]: row for row in csv.DictReader(file)}
    assert rows["8"]["val/acc_mean"] == "0.9" and rows["8"]["val/acc_std"] == ""
    assert rows["4"]["val/acc_std"] == "0.0"


def test_patch_size_plots_draw_a_point_per_group_at_its_mean_with_error_bars(seed_sweep):
    runs = reports.load_runs([seed_sweep])
    [ax] = reports.plot_metric_vs_patch_size(runs, "val/acc").axes
    [bars] = ax.containers
    line, _, (yerr,) = bars
    assert list(line.get_xdata()) == [4, 8]
    assert list(line.get_ydata()) == pytest.approx([0.975, 0.91])
    half_heights = [abs(y1 - y0) / 2 for (_, y0), (_, y1) in yerr.get_segments()]
    assert half_heights == pytest.approx([0.005, 0.02 / 2**0.5])


def test_the_throughput_scatter_draws_a_point_per_group_with_error_bars(seed_sweep):
    runs = reports.load_runs([seed_sweep])
    [ax] = reports.plot_metric_vs_throughput(runs, reports.varied_keys(runs), "val/acc").axes
    assert len(ax.containers) == 2  # two groups, not six runs
    assert [text.get_text() for text in ax.texts] == ["jobs 0,1,2: 8", "jobs 3,4,5: 4"]


def test_scatter_labels_do_not_overlap_when_runs_have_almost_the_same_speed_and_accuracy(
    tmp_path,
):
    """Seven runs within a pixel of each other, and one far off that sets the axes' range."""
    sweep = tmp_path / "multiruns" / "2026-11-22_09-00-00"
    for number in range(8):
        overrides = [f"model.pos_embed=encoding_{number}", "model.patch_size=4"]
        metrics = {"val/acc": 0.9 + 1e-5 * number, THROUGHPUT: 500.0 + 0.01 * number}
        if number == 7:
            metrics = {"val/acc": 0.5, THROUGHPUT: 1000.0}
        write_train_job(sweep / str(number), overrides, metrics)
    runs = reports.load_runs([sweep])
    fig = reports.plot_metric_vs_throughput(runs, reports.varied_keys(runs), "val/acc")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.canvas.draw()
    [ax] = fig.axes
    boxes = [Text.get_window_extent(label, renderer) for label in ax.texts]  # not the leaders
    assert len(boxes) == 8
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


# ----------------------------------------------------------------------------- the terminal


def printed(table: reports.Comparison, width: int) -> list[str]:
    """`print_table`'s lines on a console `width` columns wide."""
    console = Console(file=io.StringIO(), width=width)
    reports.print_table(table, "Runs by val/acc", console=console)
    return console.file.getvalue().splitlines()


def grid_table(sweep: Path) -> reports.Comparison:
    runs = reports.sort_runs(reports.load_runs([sweep]), "val/acc")
    return reports.comparison_table(runs, reports.varied_keys(runs), "val/acc")


def whole(token: str, lines: list[str]) -> bool:
    """True if `token` is on some line with no letter, digit or `.`/`_` glued to either side."""
    pattern = re.compile(rf"(?<![\w.]){re.escape(token)}(?![\w.])")
    return any(pattern.search(line) for line in lines)


@pytest.mark.parametrize("width", [80, 200])
def test_every_header_and_number_of_the_terminal_table_stays_whole(sweep, width):
    table = grid_table(sweep)
    lines = printed(table, width)
    assert max(len(line) for line in lines) <= width
    names = reports.short_names([c for c in table.columns if c != "error"])
    assert all(whole(name, lines) and whole(column, lines) for column, name in names.items())
    cells = {reports.cell_text(row, c) for row in table.rows for c in table.columns}
    assert all(whole(cell, lines) for cell in cells - {""})


@pytest.mark.parametrize("width", [80, 200])
def test_every_mean_and_std_of_the_terminal_table_stays_whole(seed_sweep, width):
    table = reports.mean_table(reports.load_runs([seed_sweep]), "val/acc")
    lines = printed(table, width)
    assert max(len(line) for line in lines) <= width
    assert whole("0.9750 ± 0.0050", lines) and whole("train img/s", lines)


@pytest.mark.parametrize(("width", "transposed"), [(80, True), (200, False)])
def test_a_table_wider_than_the_console_is_printed_transposed(sweep, width, transposed):
    lines = printed(grid_table(sweep), width)
    header = any("pos_embed" in line and "status" in line for line in lines)
    row_of_pos_embeds = any(re.search(r"pos_embed\W+learned\W+learned", line) for line in lines)
    assert (header, row_of_pos_embeds) == (not transposed, transposed)


def test_the_legend_names_every_shortened_column_and_only_those(sweep):
    lines = printed(grid_table(sweep), 200)
    legend = [line for line in lines if " = " in line]
    assert legend == [
        "patch_size = model.patch_size   pos_embed = model.pos_embed   "
        "precision = trainer.precision   train img/s = train/samples_per_sec"
    ]


def test_the_varied_keys_come_right_after_the_job(sweep):
    [header] = [line for line in printed(grid_table(sweep), 200) if "status" in line]
    assert re.search(r"job\W+patch_size\W+pos_embed\W+precision\W+status", header)


def test_short_names_are_the_shortest_suffix_no_other_column_ends_with():
    names = reports.short_names(["job", "model.dropout", "optimizer.dropout", "model.patch_size"])
    assert names == {
        "job": "job",
        "model.dropout": "model.dropout",
        "optimizer.dropout": "optimizer.dropout",
        "model.patch_size": "patch_size",
    }


def test_a_failed_job_s_error_is_printed_whole_under_the_table(sweep):
    lines = printed(grid_table(sweep), 80)
    assert f"job {FAILED_JOB} failed: {FAILURE}" in lines
