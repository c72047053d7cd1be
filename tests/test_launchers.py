"""`hydra/launcher=slurm` and `hydra/launcher=submitit_local`: folders, ranks and requeueing.

SLURM itself is not here, so the SLURM launcher is checked through the batch script
submitit would submit, and a requeue is played out with a `submitit_local` job that
sees SLURM's variables and a stand-in `scontrol`, then started again from its pickle
as the requeued batch script starts it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import vitlab.runs.folders
from tests.conftest import run_train_py
from vitlab.runs.launchers import pin_sweep_dir, with_requeue_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "test=false",
    "scheduler.warmup_steps=1",
    "extras.print_config=false",
]
# What SLURM gives each task of job 4242; Lightning then uses its SLURMEnvironment.
SLURM_TASK_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


@pytest.fixture
def compose_with_hydra() -> Iterator:
    """`compose_with_hydra(*overrides)` -> conf/train.yaml composed with its `hydra` node."""

    def make(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)

    yield make
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    ("overrides", "nodes", "tasks_per_node"),
    [
        (["trainer=ddp_8gpu"], 1, 8),
        (["trainer=ddp", "trainer.devices=4"], 1, 4),
        (["trainer=multinode", "trainer.devices=4"], 2, 4),
    ],
)
def test_slurm_launcher_starts_one_task_per_device_on_each_node(
    compose_with_hydra, overrides, nodes, tasks_per_node
):
    launcher = compose_with_hydra("hydra/launcher=slurm", *overrides).hydra.launcher
    assert launcher.nodes == nodes
    assert launcher.tasks_per_node == tasks_per_node
    assert launcher.gpus_per_node == tasks_per_node
    assert launcher._target_.endswith("vitlab_launchers.submitit_launchers.SlurmLauncher")


class _Submitted(Exception):
    """Raised instead of calling sbatch."""


def test_slurm_batch_script_has_the_resources_and_lightnings_requeue_signal(
    compose_with_hydra, tmp_path, monkeypatch
):
    cfg = compose_with_hydra(
        "hydra/launcher=slurm",
        "trainer=multinode",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=vision",
        "hydra.launcher.timeout_min=600",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    executors = []

    def submit_nothing(executor, *args, **kwargs):
        executors.append(executor)
        raise _Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit_nothing)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")  # submitit's SLURM executor looks for srun
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda cfg: None, config=cfg)
    with pytest.raises(_Submitted):
        launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)

    script = executors[0]._executor._make_submission_file_text("python job.py", "uid")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=2",
        "--gpus-per-node=2",
        "--partition=gpu",
        "--account=vision",
        "--time=600",
        "--signal=USR1@180",
    ):
        assert f"#SBATCH {line}\n" in script, line
    assert "USR2" not in script, "submitit's own requeue signal must not be asked for"


def test_pinned_sweep_folder_survives_a_new_process_where_the_folder_exists(
    compose_with_hydra, tmp_path, monkeypatch
):
    monkeypatch.setenv("VITLAB_ROOT", str(tmp_path))
    cfg = compose_with_hydra("hydra.mode=MULTIRUN")
    sweep_dir = pin_sweep_dir(cfg)
    Path(sweep_dir).mkdir(parents=True)
    # A job's process: nothing remembered, the folder exists, the config composed again
    # from the sweep's Hydra overrides (as `ConfigLoader.load_sweep_config` does).
    monkeypatch.setattr(vitlab.runs.folders, "_UNIQUE_DIRS", {})
    job_cfg = compose_with_hydra(*cfg.hydra.overrides.hydra, "seed=1")

    assert sweep_dir.startswith(str(tmp_path / "logs" / "train" / "multiruns"))
    assert job_cfg.hydra.sweep.dir == sweep_dir == cfg.hydra.sweep.dir


def test_every_job_runs_with_resume_auto_unless_the_command_line_sets_resume():
    assert with_requeue_overrides(["seed=1"]) == ["seed=1", "++resume=auto"]
    assert with_requeue_overrides(["resume=null", "seed=1"]) == ["resume=null", "seed=1"]
    assert with_requeue_overrides(["+resume=auto"]) == ["+resume=auto"]


def _train_multirun(cwd: Path, *overrides: str, env: dict[str, str] | None = None):
    """`python src/train.py -m ...` in `cwd`, with the default (timestamped) multirun folder."""
    return run_train_py("-m", *overrides, cwd=cwd, env=env, timeout=600)


def _only_multirun_folder(cwd: Path) -> Path:
    (sweep_dir,) = (cwd / "logs" / "train" / "multiruns").iterdir()
    return sweep_dir


def _status(job: Path) -> dict:
    return json.loads((job / "status.json").read_text())


def test_submitit_local_runs_each_job_in_its_folder_of_the_one_multirun_folder(tmp_path):
    result = _train_multirun(tmp_path, "hydra/launcher=submitit_local", "seed=1,2", *TINY)

    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = _only_multirun_folder(tmp_path)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == ["0", "1"]
    for job, seed in (("0", "seed=1"), ("1", "seed=2")):
        status = _status(sweep_dir / job)
        assert status["status"] == "completed"
        assert seed in status["overrides"] and "++resume=auto" in status["overrides"]
        assert "train/loss" in json.loads((sweep_dir / job / "metrics.json").read_text())
    submitit_jobs = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    assert len(submitit_jobs) == 2
    for folder in submitit_jobs:
        assert (folder / f"{folder.name}_0_log.out").is_file()
        assert (folder / f"{folder.name}_0_result.pkl").is_file()
    assert "2 of 2 jobs completed" in result.stdout


@pytest.mark.slow
def test_submitit_local_starts_a_process_per_device_and_lightning_takes_them_as_ranks(tmp_path):
    result = _train_multirun(tmp_path, "hydra/launcher=submitit_local", "trainer=ddp_cpu", *TINY)

    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = _only_multirun_folder(tmp_path)
    assert _status(sweep_dir / "0")["status"] == "completed"
    (job_logs,) = (p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit())
    for task in (0, 1):
        log = (job_logs / f"{job_logs.name}_{task}_log.err").read_text()
        ranks = re.findall(r"GLOBAL_RANK: (\d+), MEMBER: (\d+)/(\d+)", log)
        assert ranks == [(str(task), str(task + 1), "2")], log[-2000:]


def _fake_scontrol(folder: Path) -> Path:
    """An `scontrol` that records its arguments and, as SLURM does on a requeue, stops the job."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text('#!/bin/sh\necho "$@" >> "$FAKE_SCONTROL_LOG"\nkill -TERM $PPID\n')
    script.chmod(0o755)
    return folder / "calls.txt"


@pytest.mark.slow
def test_requeue_signal_checkpoints_and_requeues_and_the_restarted_job_resumes_in_its_folder(
    tmp_path,
):
    calls = _fake_scontrol(tmp_path / "bin")
    slurm_env = {
        **SLURM_TASK_ENV,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),  # the job imports the signal-sending callback from tests/
        "FAKE_SCONTROL_LOG": str(calls),
    }
    send_usr1 = (
        "++callbacks.send_requeue_signal={_target_: tests.test_signals.SendSignalAt, "
        f"signum: {int(signal.SIGUSR1)}, batch_idx: 2}}"
    )
    _train_multirun(
        tmp_path,
        "hydra/launcher=submitit_local",
        send_usr1,
        *TINY,
        "trainer.max_steps=6",
        env=slurm_env,
    )

    sweep_dir = _only_multirun_folder(tmp_path)
    job = sweep_dir / "0"
    assert calls.read_text() == "requeue 4242\n"
    assert torch.load(job / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert _status(job)["status"] == "interrupted"

    # The requeued batch script runs the same pickled job again, with the same job id.
    (submitted,) = (sweep_dir / ".submitit").glob("*/*_submitted.pkl")
    job_id = submitted.parent.name
    local_task_env = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_JOB_ID": job_id,
        "SUBMITIT_LOCAL_NTASKS": "1",
        "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
        "SUBMITIT_LOCAL_NODEID": "0",
        "SUBMITIT_LOCAL_GLOBALID": "0",
        "SUBMITIT_LOCAL_LOCALID": "0",
    }
    restarted = subprocess.run(
        [sys.executable, "-m", "submitit.core._submit", str(submitted.parent)],
        cwd=tmp_path,
        env={**os.environ, **slurm_env, **local_task_env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )

    output = restarted.stdout + restarted.stderr
    assert restarted.returncode == 0, output[-3000:]
    restored = re.search(r"Restored all states from the checkpoint at (\S+)", output)
    assert restored, output[-3000:]
    assert Path(restored.group(1)).resolve().is_relative_to(job.resolve())
    assert _status(job)["status"] == "completed" and (job / "metrics.json").is_file()
    assert (submitted.parent / f"{job_id}_0_result.pkl").is_file()
    assert [p.name for p in (tmp_path / "logs" / "train" / "multiruns").iterdir()] == [
        sweep_dir.name
    ]
