"""hydra-submitit-launcher's SLURM and local launchers, with what `vitlab.runs.launchers` adds.

Both pin the multirun folder at submission and run every job with `resume=auto`; the
local one also makes each task of a job one of Lightning's ranks, as srun does on SLURM.
A job's own process composes its config again, so it registers vitlab's resolvers first,
as the entry points do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import DictConfig

from vitlab.runs.folders import register_resolvers
from vitlab.runs.launchers import export_local_ranks, pin_sweep_dir, with_requeue_overrides


class _PinnedFolderResumingJobs:
    """Mixed into both launchers: the multirun folder fixed at submission, `resume=auto` jobs,
    vitlab's resolvers in each job's process."""

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        pin_sweep_dir(config)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        jobs = [with_requeue_overrides(overrides) for overrides in job_overrides]
        return super().launch(jobs, initial_job_idx)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        register_resolvers()
        return super().__call__(*args, **kwargs)


class SlurmLauncher(_PinnedFolderResumingJobs, submitit_launcher.SlurmLauncher):
    """SLURM job arrays; srun starts one task per device and Lightning reads their ranks."""


class LocalLauncher(_PinnedFolderResumingJobs, submitit_launcher.LocalLauncher):
    """The same on this machine: jobs in subprocesses, one task per device, each task a rank."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        import submitit  # as the plugin does: only a job's own process needs it

        export_local_ranks(submitit.JobEnvironment())
        return super().__call__(*args, **kwargs)
