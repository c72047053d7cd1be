"""Pick the plain formulation or a speed path by timing both, once per machine and kernel.

A speed path that wins on one CPU can lose on another: oneDNN's fused Linear + GELU
beats a plain Linear and GELU on an AVX-512 Xeon and loses to them on an AVX2 EPYC,
and the sigmoid form of the tanh GELU (`fast.tanh_gelu`) beats PyTorch's kernel
where that kernel's vectorised tanh is slow. So where the winner depends on the
machine, `choose` runs each candidate a few times on a small input of the kernel's
shape the first time the kernel is needed, and keeps the fastest by median. The
plain formulation stays unless another is faster by `MARGIN`: no path may be slower
than the one it replaces. The choice is cached per machine (CPU model and family, instruction
sets, threads, torch version) and kernel in a JSON file (`cache_path`), so later
processes on the same machine reuse it; `VITLAB_KERNEL_CACHE` moves the file, and a
file that cannot be read or written only costs a measurement.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# A candidate must beat the plain formulation's median by this fraction to be chosen.
MARGIN = 0.03
# Timed calls per candidate, interleaved (A B A B ...), after one untimed call each.
REPEATS = 5
# The instruction sets that change which kernel wins (`/proc/cpuinfo` flags).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "neon", "asimd")

_CHOICES: dict[tuple[str, str], str] = {}


def cache_path() -> Path:
    """Where the choices are kept: `$VITLAB_KERNEL_CACHE`, else the user's cache folder."""
    if os.environ.get("VITLAB_KERNEL_CACHE"):
        return Path(os.environ["VITLAB_KERNEL_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vitlab" / "kernels.json"


def machine_key() -> str:
    """What a measured choice holds for: CPU model and family, instruction sets, threads, torch."""
    return f"{processor()} threads={torch.get_num_threads()} torch={torch.__version__}"


@cache
def processor() -> str:
    """This machine's `describe_processor`, read once; the benchmark's report names it too."""
    try:
        return describe_processor(Path("/proc/cpuinfo").read_text())
    except OSError:
        return describe_processor("")


def describe_processor(cpuinfo: str) -> str:
    """The CPU model, its x86 family and model numbers, and the `ISA_FLAGS` it has.

    Virtual machines often mask the model name (two AMD EPYC generations both read
    "AMD EPYC"), and a Zen 1 core splits each AVX2 instruction in two where a Zen 3
    core does not, so the family and model numbers are part of what a choice holds for.
    """
    model, numbers, flags = platform.processor() or platform.machine(), [], set()
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name":
            model = value
        elif key in ("cpu family", "model"):
            numbers.append(f"{key} {value}")
        elif key in ("flags", "Features"):
            flags = set(value.split())
            break
    family = f" ({', '.join(numbers)})" if numbers else ""
    return f"{model}{family} [{'+'.join(flag for flag in ISA_FLAGS if flag in flags) or '-'}]"


def choose(
    kernel: str,
    candidates: Callable[[], Mapping[str, Callable[[], object]]],
    reference: str,
    timer: Callable[[], float] = time.perf_counter,
) -> str:
    """The name of the fastest candidate for `kernel`, measured once per machine.

    `candidates()` builds the calls to time, by name, each running the kernel on a
    representative input; it is called only when there is no choice yet, so a
    kernel asks on every call at the cost of a dict lookup. `reference` names the
    plain formulation, kept unless another's median time is `MARGIN` below its own.
    Choices are remembered in the process and in the cache file.
    """
    choice = chosen(kernel)
    if choice is None:
        seconds = measure(candidates(), timer)
        choice = fastest(seconds, reference)
        path = cache_path()
        _write(path, machine_key(), kernel, {"choice": choice, "seconds": seconds})
        log.info(
            "kernel %s: %s (%s), cached in %s",
            kernel,
            choice,
            ", ".join(f"{name} {1e3 * s:.2f} ms" for name, s in seconds.items()),
            path,
        )
        _CHOICES[(machine_key(), kernel)] = choice
    return choice


def chosen(kernel: str) -> str | None:
    """The choice already made for `kernel` on this machine (in this process or the cache
    file), or None: never measures, for callers that cannot time anything right now."""
    memo = (machine_key(), kernel)
    if memo not in _CHOICES:
        choice = _read(cache_path()).get(memo[0], {}).get(kernel, {}).get("choice")
        if not isinstance(choice, str):
            return None
        _CHOICES[memo] = choice
    return _CHOICES[memo]


def measure(
    candidates: Mapping[str, Callable[[], object]], timer: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds per call of each candidate: one untimed call each, then `REPEATS`
    interleaved rounds, so a machine that slows down meanwhile slows all alike."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(REPEATS):
        for name, run in candidates.items():
            start = timer()
            run()
            times[name].append(timer() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fastest(seconds: Mapping[str, float], reference: str) -> str:
    """The candidate with the least time, if it beats `reference` by `MARGIN`, else `reference`."""
    best = min(seconds, key=seconds.__getitem__)
    return best if seconds[best] < (1 - MARGIN) * seconds[reference] else reference


def forget() -> None:
    """Drop the choices remembered in this process (the cache file is left alone)."""
    _CHOICES.clear()


def _read(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _write(path: Path, machine: str, kernel: str, entry: dict) -> None:
    """Merge one choice into the file, written whole to a temporary name and renamed
    into place, so a reader in another process never sees half a file."""
    content = _read(path)
    machines = content.setdefault(machine, {})
    if not isinstance(machines, dict):
        content[machine] = machines = {}
    machines[kernel] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(content, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError as err:
        log.debug("kernel choice not cached in %s: %s", path, err)
