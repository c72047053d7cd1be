"""Multi-process training: the FSDP strategy for our blocks, and DDP inside a Hydra multirun.

`fsdp_strategy` exists because a YAML file cannot name a Python set of classes:
`conf/trainer/fsdp.yaml` targets it to shard each transformer `Block` and each
`MixerBlock` as its own FSDP unit.

`MultirunRanks` fixes how Lightning starts DDP ranks inside `python src/train.py -m`.
Lightning's launcher (`_SubprocessScriptLauncher`) starts rank 1, 2, ... as
`python <sys.argv> hydra.run.dir=<HydraConfig.get().run.dir> hydra.output_subdir=null`.
Inside a multirun that argv holds `-m` and the whole sweep, and `run.dir` is not the
job's folder: every rank would run its own nested sweep, and under Optuna would
train different hyperparameters. For the duration of each job this Hydra callback
makes the argv this job's overrides alone (`hydra.mode=RUN`) and `run.dir` the job's
folder, so the ranks compose exactly the job's config and write where rank 0 writes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, read_write
from torch import nn

from vitlab.models.layers import Block
from vitlab.models.mixer import MixerBlock
from vitlab.runs.multirun import MULTIRUN_JOB_ENV

# Each one becomes an FSDP unit; what is left (embeddings, norms, head) stays in the root unit.
FSDP_BLOCKS: frozenset[type[nn.Module]] = frozenset({Block, MixerBlock})

# Set by Lightning's launcher in rank 0's own environment when it starts the other ranks.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides a rank must not inherit: the mode (the rank runs one job), and what
# Lightning appends itself.
_NOT_FOR_RANKS = ("hydra.mode=", "hydra.run.dir=", "hydra.output_subdir=", "hydra.job.name=")


def fsdp_strategy(
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"] = "FULL_SHARD",
    cpu_offload: bool = False,
    **kwargs: Any,
) -> FSDPStrategy:
    """Lightning's `FSDPStrategy`, wrapping every ViT `Block` and `MixerBlock` separately.

    Wrapping per block, not the whole model, is what saves memory: a block's full
    parameters exist only while that block runs. Checkpoints are saved as one full
    state dict (`state_dict_type="full"`), so `src/eval.py` and `ckpt_path=` read
    them like any other. `kwargs` go to `FSDPStrategy` unchanged.
    """
    return FSDPStrategy(
        auto_wrap_policy=set(FSDP_BLOCKS),
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type="full",
        **kwargs,
    )


def rank_argv(config: DictConfig) -> list[str]:
    """The command-line arguments that make a new process compose this job's config alone.

    The job's task overrides (the sweep's choice for it included: grid values, Optuna's
    suggestions), the command line's Hydra overrides except the mode and what Lightning
    appends itself (sweeper settings are inert in a single run), and `hydra.mode=RUN`,
    which also beats a `hydra.mode: MULTIRUN` set by a `sweep/` config.
    """
    hydra_overrides = [o for o in config.hydra.overrides.hydra if not o.startswith(_NOT_FOR_RANKS)]
    return [*config.hydra.overrides.task, *hydra_overrides, "hydra.mode=RUN"]


class MultirunRanks(Callback):
    """Hydra callback: DDP ranks started during a multirun job run that job, in its folder.

    At the job's start, `sys.argv` becomes `<script> <rank_argv>` and `hydra.run.dir`
    the job's output folder; Lightning builds the other ranks' command line from both.
    `VITLAB_MULTIRUN_JOB` tells those ranks that they belong to a multirun job
    (`vitlab.runs.multirun.is_multirun`), so that a failure ends the job, not the sweep.
    At the job's end it restores `sys.argv`, tears down the process group and removes
    the variables the launcher set (`LOCAL_RANK`, `MASTER_PORT`, ...): with them left
    in place, the next job's Trainer would take the processes as started externally
    and wait for ranks that never come. Outside a multirun it does nothing.
    """

    def __init__(self) -> None:
        self._argv: list[str] | None = None
        self._environ: dict[str, str | None] = {}
        self._had_process_group = False

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        self._argv = list(sys.argv)
        self._environ = {key: os.environ.get(key) for key in (*LAUNCHER_ENV, MULTIRUN_JOB_ENV)}
        self._had_process_group = _process_group_initialized()
        sys.argv = [sys.argv[0], *rank_argv(config)]
        os.environ[MULTIRUN_JOB_ENV] = str(config.hydra.runtime.output_dir)
        with read_write(config.hydra):
            config.hydra.run.dir = config.hydra.runtime.output_dir
        # HydraConfig holds a copy of the hydra node, made when the job started.
        HydraConfig.instance().set_config(config)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._argv is None:
            return
        sys.argv, self._argv = self._argv, None
        if _process_group_initialized() and not self._had_process_group:
            torch.distributed.destroy_process_group()
        for key, value in self._environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _process_group_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
