"""Multi-process training: the trainer configs, FSDP's units, and DDP for real on the CPU.

The DDP runs are `python src/train.py trainer=ddp_cpu ...` subprocesses (never DDP
inside the pytest process): 2 ranks over gloo, a tiny ViT on the digits. Each rank
writes the config it trains with (`tests/ddp_probe.py`), so the tests can tell what
every rank ran, and where.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import run_train_py, tiny_vit
from vitlab.errors import ConfigError
from vitlab.models import MlpMixer
from vitlab.models.flexi import draw_patch_size
from vitlab.models.layers import Block
from vitlab.models.mixer import MixerBlock
from vitlab.runs.build import build_classifier
from vitlab.runs.validate import check_trainer
from vitlab.training.classifier import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "data.image_size=16",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.mlp_dim=64",
    # No scheduler.warmup_steps: the default warmup is cut to the run's few steps.
    "callbacks.progress_bar=null",
)
# Each rank writes <run folder>/rank<r>.json: its rank, the world size and its resolved config.
PROBE = (
    "+callbacks.probe._target_=tests.ddp_probe.RankConfig",
    "+callbacks.probe.dirpath=${paths.output_dir}",
)
GPU_TRAINERS = ("ddp", "ddp_8gpu", "fsdp", "multinode")
FLEXI_SIZES = [2, 4, 8]


def _train_py(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python src/train.py args` in `cwd`; the ranks it starts can import `tests.ddp_probe`."""
    return run_train_py(*args, cwd=cwd)


def _ranks(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob("rank*.json"))]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- The trainer configs ------------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_TRAINERS)
def test_gpu_trainer_configs_are_refused_without_a_gpu(make_cfg, name):
    cfg = make_cfg(f"trainer={name}")
    with pytest.raises(
        ConfigError, match=r"trainer.accelerator=gpu .* no CUDA GPU; use trainer=cpu"
    ):
        check_trainer(cfg.trainer, gpu_available=False)


def test_ddp_cpu_is_two_gloo_processes_that_pass_the_check_without_a_gpu(make_cfg):
    cfg = make_cfg("trainer=ddp_cpu")
    check_trainer(cfg.trainer, gpu_available=False)
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 2)
    assert cfg.trainer.strategy.process_group_backend == "gloo"


@pytest.mark.parametrize(
    ("name", "strategy", "devices", "num_nodes", "precision"),
    [
        ("ddp", "ddp", 2, 1, "32-true"),
        ("ddp_8gpu", "ddp", 8, 1, "bf16-mixed"),
        ("fsdp", "vitlab.training.fsdp.fsdp_strategy", 2, 1, "bf16-mixed"),
        ("multinode", "ddp", 2, 2, "32-true"),
    ],
)
def test_trainer_config_sets_strategy_devices_nodes_and_precision(
    make_cfg, name, strategy, devices, num_nodes, precision
):
    trainer = make_cfg(f"trainer={name}").trainer
    shown_strategy = (
        trainer.strategy if isinstance(trainer.strategy, str) else trainer.strategy._target_
    )
    assert (shown_strategy, trainer.accelerator) == (strategy, "gpu")
    assert (trainer.devices, trainer.num_nodes, trainer.precision) == (
        devices,
        num_nodes,
        precision,
    )


@pytest.mark.slow
def test_cfg_job_of_ddp_8gpu_prints_ddp_on_8_gpus_in_bf16(tmp_path):
    result = _train_py(tmp_path, "trainer=ddp_8gpu", "--cfg", "job", "--package", "trainer")
    assert result.returncode == 0, result.stderr[-3000:]
    trainer = yaml.safe_load(result.stdout)  # the `trainer` node itself
    assert trainer["strategy"] == "ddp"
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == (
        "gpu",
        8,
        "bf16-mixed",
    )


def _tiny_mixer() -> MlpMixer:
    return MlpMixer(
        image_size=16,
        patch_size=4,
        num_classes=10,
        hidden_dim=32,
        num_blocks=2,
        tokens_mlp_dim=16,
        channels_mlp_dim=64,
    )


@pytest.mark.parametrize("build", [tiny_vit, _tiny_mixer], ids=["vit", "mixer"])
def test_fsdp_makes_each_block_a_unit_and_leaves_the_rest_to_the_root(make_cfg, build):
    model = build()
    strategy = hydra.utils.instantiate(make_cfg("trainer=fsdp").trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    # The modules FSDP wraps in units of their own (the root is always wrapped, last).
    units = set(policy._run_policy(model, ignored_modules=set(), root_kwargs={}))
    blocks = {m for m in model.modules() if isinstance(m, (Block, MixerBlock))}
    assert len(blocks) == 2
    assert units == blocks
    assert strategy._state_dict_type == "full", "checkpoints must stay single files for eval.py"


TORCHRUN_ENV = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "GROUP_RANK": "0",
    "LOCAL_WORLD_SIZE": "2",
    "WORLD_SIZE": "4",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "test",
}
SLURM_ENV = {
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NAME": "train",
    "SLURM_NODELIST": "node[1-2]",
}


@pytest.mark.parametrize(
    ("env", "environment"),
    [(TORCHRUN_ENV, TorchElasticEnvironment), (SLURM_ENV, SLURMEnvironment)],
    ids=["torchrun", "slurm"],
)
def test_multinode_takes_its_ranks_from_torchrun_or_slurm(make_cfg, monkeypatch, env, environment):
    for key in (*TORCHRUN_ENV, *SLURM_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer sets it
    cfg = make_cfg("trainer=multinode", "trainer.accelerator=cpu")  # no GPU on the test machine
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy.cluster_environment, environment)
    assert trainer.strategy.cluster_environment.creates_processes_externally
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 2, 4)


# --- Metrics that sum over samples, whatever the batches ------------------------------------


def test_epoch_loss_is_the_mean_over_samples_not_over_batches():
    """Batches of 4, 4 and 2 samples: the mean of the three batch means would differ.

    The same reduction, summed over ranks, makes DDP's loss equal one process's.
    """
    torch.manual_seed(0)
    images, labels = torch.randn(10, 3, 16, 16), torch.arange(10)
    model = ImageClassifier(tiny_vit(), num_classes=10)
    model.backbone.head.weight.data.normal_()  # a zero head would give every sample one loss
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (logged,) = trainer.validate(model, dataloaders=loader, verbose=False)
    with torch.no_grad():
        per_sample = F.cross_entropy(model(images), labels, reduction="none")
    batch_means = torch.stack([chunk.mean() for chunk in per_sample.split(4)])
    assert logged["val/loss"] == pytest.approx(per_sample.mean().item(), abs=1e-6)
    assert abs(batch_means.mean().item() - per_sample.mean().item()) > 1e-4


# --- DDP on the CPU, one run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One epoch of 3 steps on 2 ranks, then the test split with the best checkpoint.

    Validation and test sets of odd size (201, 299) give the ranks shards of unequal size.
    FlexiViT is on, so that the ranks' drawn patch sizes can be compared; so is the EMA of
    the weights, so that its metrics can be compared with one process's.
    """
    cwd = tmp_path_factory.mktemp("ddp_run")
    result = _train_py(
        cwd,
        "trainer=ddp_cpu",
        *TINY,
        *PROBE,
        "data.batch_size=32",
        "data.val_size=201",
        "data.test_size=299",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        f"model.flexi_patch_sizes=[{','.join(map(str, FLEXI_SIZES))}]",
        "callbacks.ema.decay=0.9",
    )
    return cwd, result


@pytest.mark.slow
def test_ddp_cpu_trains_two_ranks_in_one_run_folder(ddp_run):
    cwd, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((cwd / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, f"rank 1 must write into rank 0's folder, found {runs}"
    rank0, rank1 = _ranks(runs[0])
    assert (rank0["rank"], rank1["rank"], rank1["world_size"]) == (0, 1, 2)
    assert rank0["config"] == rank1["config"]
    assert _json(runs[0] / "status.json")["status"] == "completed"
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert result.stdout.count("Final metrics") == 1, "only rank 0 writes and prints the metrics"


@pytest.mark.slow
def test_ddp_ranks_draw_the_same_flexi_patch_size_at_every_step(ddp_run):
    cwd, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "logs" / "train" / "runs").iterdir()
    rank0, rank1 = _ranks(run)
    seed = rank0["config"]["seed"]
    expected = [draw_patch_size(FLEXI_SIZES, seed, step) for step in range(3)]
    assert rank0["patch_sizes"] == rank1["patch_sizes"] == expected


@pytest.mark.slow
def test_ddp_val_and_test_metrics_equal_one_process_on_the_same_weights(ddp_run):
    cwd, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "logs" / "train" / "runs").iterdir()
    ddp_metrics = _json(run / "metrics.json")
    # The best checkpoint holds the weights of the epoch's validation and of the test.
    (ckpt,) = (run / "checkpoints").glob("epoch_*.ckpt")
    cfg = OmegaConf.create(
        torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    )
    datamodule = hydra.utils.instantiate(cfg.data)
    model = build_classifier(cfg, with_optimizer=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    one_process = {
        **trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)[0],
        **trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)[0],
    }
    names = [f"{split}/{m}" for split in ("val", "test") for m in ("loss", "acc", "acc_top5")]
    assert set(names) <= set(one_process)
    for name in names:
        assert ddp_metrics[name] == pytest.approx(one_process[name], abs=1e-6), name


@pytest.mark.slow
def test_ddp_ema_metrics_equal_one_process_on_the_checkpoints_ema_weights(ddp_run):
    cwd, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (cwd / "logs" / "train" / "runs").iterdir()
    ddp_metrics = _json(run / "metrics.json")
    (ckpt,) = (run / "checkpoints").glob("epoch_*.ckpt")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["ema_state_dict"].keys() == checkpoint["state_dict"].keys()
    cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    datamodule = hydra.utils.instantiate(cfg.data)
    model = build_classifier(cfg, with_optimizer=False)
    model.ema_weights = True
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    one_process = {
        **trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)[0],
        **trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)[0],
    }
    for split in ("val", "test"):
        for name in ("acc", "loss"):
            got = ddp_metrics[f"{split}/{name}_ema"]
            assert got == pytest.approx(one_process[f"{split}/{name}"], abs=1e-6), split + name


# --- DDP inside a multirun ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_multirun(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-job grid of DDP jobs, the first failing inside `fit`, on both ranks.

    `sweep=patch_pos_precision` (narrowed to one point) sets `hydra.mode: MULTIRUN` in
    its config, so the ranks must be told to run one job. Job 0's global batch 33 does
    not split over 2 ranks; job 1's 32 does. No `hydra.sweep.dir` is given: with the
    default dated folder, a rank that started its own sweep would show as a second one.
    """
    cwd = tmp_path_factory.mktemp("ddp_multirun")
    result = _train_py(
        cwd,
        "-m",
        "sweep=patch_pos_precision",
        "model.patch_size=4",
        "model.pos_embed=learned",
        "trainer.precision=32-true",
        "data.batch_size=33,32",
        "trainer=ddp_cpu",
        *TINY,
        *PROBE,
        "trainer.max_steps=3",
        "test=false",
    )
    return cwd, result


def _sweep_jobs(cwd: Path) -> list[Path]:
    sweeps = list((cwd / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, f"one multirun folder, no nested sweeps of the ranks: {sweeps}"
    return sorted(p for p in sweeps[0].iterdir() if p.is_dir())


@pytest.mark.slow
def test_ddp_multirun_job_ranks_run_that_job_in_its_folder(ddp_multirun):
    cwd, result = ddp_multirun
    jobs = _sweep_jobs(cwd)
    assert [job.name for job in jobs] == ["0", "1"], result.stderr[-3000:]
    assert not (cwd / "logs" / "train" / "runs").exists(), "no rank ran as a run of its own"
    rank0, rank1 = _ranks(jobs[1])
    assert (rank0["rank"], rank1["rank"], rank1["world_size"]) == (0, 1, 2)
    assert rank0["config"] == rank1["config"], "both ranks train the same hyperparameters"
    assert rank1["config"]["data"]["batch_size"] == 32
    assert rank1["config"]["paths"]["output_dir"] == str(jobs[1])
    assert _json(jobs[1] / "status.json")["status"] == "completed"
    assert "train/loss" in _json(jobs[1] / "metrics.json")


@pytest.mark.slow
def test_ddp_multirun_job_failing_on_every_rank_fails_alone(ddp_multirun):
    cwd, result = ddp_multirun
    jobs = _sweep_jobs(cwd)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 2 jobs completed" in result.stdout
    failed = _json(jobs[0] / "status.json")
    assert failed["status"] == "failed"
    assert "data.batch_size=33 is the global batch" in failed["error"]
    assert "data.batch_size=33" in failed["overrides"]
    assert _json(jobs[1] / "status.json")["status"] == "completed", "the sweep went on"
