"""Where the benchmark runs: the one device, what the machine is, and a step's peak memory.

A speed means little without the machine it was measured on, so the report records
the CPU, the GPU, the load average before and after, and the versions that matter.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from vitlab.errors import ConfigError
from vitlab.models.kernel_choice import processor
from vitlab.runs.provenance import package_versions
from vitlab.runs.validate import GPU_ACCELERATORS, runs_on_cpu


def bench_device(trainer_cfg: Mapping[str, Any]) -> torch.device:
    """The one device the trainer config runs on; more than one is refused."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    if devices not in (1, "1", [0]) or nodes != 1:
        raise ConfigError(
            f"trainer.devices={devices!r}, trainer.num_nodes={nodes!r}: the benchmark measures "
            "one device; use trainer.devices=1 trainer.num_nodes=1"
        )
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if runs_on_cpu(trainer_cfg):
        return torch.device("cpu")
    if accelerator in (*GPU_ACCELERATORS, "auto"):  # auto, and a GPU is there
        return torch.device("cuda", torch.cuda.current_device())
    raise ConfigError(
        f"trainer.accelerator={accelerator!r}: the benchmark runs on cpu, gpu, cuda or auto"
    )


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def describe_machine(device: torch.device) -> dict[str, Any]:
    """CPU model (`kernel_choice.processor`) and cores, the GPU if used, the load average, and the versions that matter."""
    return {
        "cpu": processor(),  # model, x86 family and model numbers, AVX2/AVX-512/AMX flags
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1min": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,  # with its build, e.g. 2.5.1+cu124
        **package_versions(("lightning", "timm")),
    }


def peak_step_memory(step: Callable[[], None], device: torch.device) -> float | None:
    """Bytes: the highest allocation during one `step()` above what was allocated when it began.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the allocations and frees that
    PyTorch's CPU allocator reports to `torch.profiler` (tensors only, not the
    process's RSS). Other devices: None.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        return None
    return _profiled_cpu_peak(step)


def _profiled_cpu_peak(step: Callable[[], None]) -> float:
    """One `step()` under `torch.profiler(profile_memory=True)`: its allocations and frees,
    summed in time order, and the highest level they reach."""
    # Kineto would log "gpuGetDeviceCount failed" on a machine without a GPU: not an error here.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return float(peak)
