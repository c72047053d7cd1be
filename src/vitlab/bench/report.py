"""The benchmark's results: the ratios between contenders, `bench.json` and the `bench.md` table.

A ratio is taken per round and then summarised (median, min, max): two contenders
measured moments apart share the machine's state, so their ratio is steadier than
the ratio of two medians. The ratio of the best rounds is reported too, since time
taken by other processes only ever slows a round down. Compile times have a table
of their own: they are never part of img/s.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitlab.bench.loops import (
    BARE,
    BARE_COMPILED,
    FIT,
    INFER,
    INFER_COMPILED,
    LOOP_NAMES,
    Contender,
)
from vitlab.bench.matmul_bound import matmul_bound_mfu
from vitlab.runs.multirun import config_choice

# Each ratio: (model, loop) over (model, loop).
RATIOS = {
    "ours/timm train (bare loops)": (("vitlab", BARE), ("timm", BARE)),
    "ours/timm infer": (("vitlab", INFER), ("timm", INFER)),
    "Lightning fit / bare loop (ours)": (("vitlab", FIT), ("vitlab", BARE)),
    "ours in Lightning fit / timm bare loop": (("vitlab", FIT), ("timm", BARE)),
    "ours/timm train (compiled bare loops)": (("vitlab", BARE_COMPILED), ("timm", BARE_COMPILED)),
    "ours/timm infer (compiled)": (("vitlab", INFER_COMPILED), ("timm", INFER_COMPILED)),
}


def ratios_over_rounds(contenders: list[Contender]) -> dict[str, dict[str, Any]]:
    """Median, min and max over rounds of each round's ratio of two contenders (`RATIOS`),
    and the ratio of their best rounds; a ratio whose contenders did not race is left out."""
    samples = {(c.model, c.loop): c.samples for c in contenders}
    ratios = {}
    for name, (a, b) in RATIOS.items():
        if a in samples and b in samples:
            per_round = [x / y for x, y in zip(samples[a], samples[b], strict=True)]
            ratios[name] = {
                "median": statistics.median(per_round),
                "min": min(per_round),
                "max": max(per_round),
                "of_bests": max(samples[a]) / max(samples[b]),
                "per_round": per_round,
            }
    return ratios


def bench_report(
    cfg: DictConfig,
    settings: dict[str, Any],
    input_shape: tuple[int, ...],
    machine: dict[str, Any],
    peak_flops: Sequence[float],
    contenders: list[Contender],
    compiled_left_out: str | None = None,
) -> dict[str, Any]:
    """Everything `bench.json` holds: what ran (model, batch, precision, the `bench` settings,
    machine), the peak (the best of `peak_flops`, one per round) and each measured round's,
    each contender's rounds and summary, the ratios, and why compiled contenders asked for
    were left out (`compiled_left_out`, None if none were)."""
    rounds = settings["rounds"]
    best_peak = max(peak_flops)
    compile_value = cfg.get("compile")
    return {
        "model": _model_name(cfg),
        "batch_size": input_shape[0],
        "input_shape": list(input_shape[1:]),
        "precision": str(cfg.trainer.precision),
        "compile": OmegaConf.to_container(compile_value)
        if OmegaConf.is_config(compile_value)
        else compile_value,
        "settings": settings,
        "machine": machine,
        "peak_flops": best_peak,
        # The measured rounds' peaks, in the order of each contender's `samples`.
        "peak_flops_rounds": list(peak_flops[len(peak_flops) - rounds :]),
        "contenders": [_contender_summary(c, best_peak, input_shape[0]) for c in contenders],
        "ratios": ratios_over_rounds(contenders),
        "compiled_left_out": compiled_left_out,
    }


def _contender_summary(contender: Contender, peak_flops: float, batch: int) -> dict[str, Any]:
    """One contender's entry in `bench.json`: its rounds, their median and best, MFU, its
    matmul-bound MFU (`vitlab.bench.matmul_bound`), memory."""
    c = contender
    return {
        "model": c.model,
        "loop": c.loop,
        "description": c.description,
        "images_per_sec": c.median,
        "best_images_per_sec": c.best,
        "samples": c.samples,
        "flops_per_image": c.flops_per_image,
        "achieved_flops": c.median * c.flops_per_image,
        "mfu": c.median * c.flops_per_image / peak_flops,
        "matmul_seconds_per_step": c.matmul_seconds,
        "matmul_bound_mfu": matmul_bound_mfu(
            c.flops_per_image * batch, c.matmul_seconds, peak_flops
        ),
        "peak_memory_bytes": c.peak_memory,
        "params": c.params,
        "compiled": c.compiled,
        "compile_seconds": c.compile_seconds,
    }


def _model_name(cfg: DictConfig) -> str:
    """The `model=` choice (e.g. vit_s16) when Hydra composed the config, else the class name."""
    return config_choice("model") or str(cfg.model.get("_target_", "model")).rsplit(".", 1)[-1]


def write_report(report: dict[str, Any], output_dir: Path) -> str:
    """Write `bench.json` and `bench.md` into `output_dir`; returns the Markdown."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_report(report)
    (output_dir / "bench.md").write_text(table)
    return table


def markdown_report(report: dict[str, Any]) -> str:
    """The benchmark's Markdown: what ran where, one row per contender, the compile times
    of the compiled ones, then the ratios."""
    lines = [*_header_lines(report), "", *_contender_table(report["contenders"])]
    compiled = [c for c in report["contenders"] if c["compile_seconds"] is not None]
    if compiled:
        lines += ["", *_compile_time_table(compiled)]
    if report["ratios"]:
        lines += ["", *_ratio_table(report["ratios"])]
    return "\n".join(lines) + "\n"


def _header_lines(report: dict[str, Any]) -> list[str]:
    """The title (model, batch, input, precision) and the machine, peak, method and memory notes."""
    machine = report["machine"]
    settings = report["settings"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cpu_cores']} cores"
    memory_note = (
        "torch.cuda.max_memory_allocated"
        if machine["device"].startswith("cuda")
        else "PyTorch CPU allocator, via torch.profiler; not RSS"
    )
    return [
        f"### {report['model']}: batch {report['batch_size']}, input "
        f"{'x'.join(map(str, report['input_shape']))}, {report['precision']}"
        + (f", compile={report['compile']}" if report["compile"] else ""),
        "",
        f"- Machine: {where} ({machine['device']}, {machine['torch_threads']} torch threads); "
        f"torch {machine['torch']}, lightning {machine['lightning']}, timm {machine['timm']}; "
        f"1-min load average {machine['load_average_1min']:.2f} before, "
        f"{machine['load_average_1min_after']:.2f} after.",
        f"- Peak: {_with_si_prefix(report['peak_flops'], 'FLOP/s')}, the best "
        f"{settings['peak_matmul_size'] or 'default'}² matmul in the run's dtype, measured "
        "in every round.",
        f"- Method: {settings['warmup_rounds']} warm-up round(s), then {settings['rounds']} rounds "
        f"of {settings['steps']} timed steps per contender, interleaved (the order reversed every "
        "round); medians over rounds "
        "(min–max in brackets); other processes only slow a round down, so the best round "
        "and the ratio of bests are the least disturbed.",
        "- Matmul-bound: the MFU a contender would reach if only its matmul kernels took "
        "time (mm, addmm, bmm, convolutions, fused attention: their self time under "
        "torch.profiler in a round's steps, after the rounds; CPU only). MFU / matmul-bound is the share "
        "of the step in matmuls; what remains is the work around them.",
        f"- Peak memory: one step's highest allocation above its start ({memory_note}).",
    ] + (
        [f"- Compiled contenders left out: {report['compiled_left_out']}."]
        if report["compiled_left_out"]
        else []
    )


def _contender_table(contenders: list[dict[str, Any]]) -> list[str]:
    """One row per contender: img/s (median, min–max), FLOPs, achieved FLOP/s, MFU, the
    matmul-bound MFU, memory, params."""
    lines = [
        "| model | loop | img/s | FLOPs/img | achieved | MFU | matmul-bound | peak memory | params |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in contenders:
        speed = _rounded_rate(c["images_per_sec"])
        spread = f"{_rounded_rate(min(c['samples']))}–{_rounded_rate(max(c['samples']))}"
        memory = c["peak_memory_bytes"]
        bound = c["matmul_bound_mfu"]
        lines.append(
            f"| {c['description']} | {LOOP_NAMES[c['loop']]} | {speed} ({spread}) "
            f"| {_with_si_prefix(c['flops_per_image'], 'FLOP')} "
            f"| {_with_si_prefix(c['achieved_flops'], 'FLOP/s')} "
            f"| {c['mfu']:.1%} | {'—' if bound is None else f'{bound:.1%}'} "
            f"| {'—' if memory is None else f'{memory / 2**20:.0f} MiB'} "
            f"| {c['params'] / 1e6:.2f} M |"
        )
    return lines


def _compile_time_table(contenders: list[dict[str, Any]]) -> list[str]:
    """One row per compiled contender: the wall time of its untimed first call, its compile."""
    lines = [
        "Compile time: a compiled contender's untimed first call (a bare loop's first step, "
        "which compiles forward and backward; inference's first pass). No img/s above "
        "includes it.",
        "",
        "| model | loop | compile time (s) |",
        "| --- | --- | ---: |",
    ]
    for c in contenders:
        lines.append(
            f"| {c['description']} | {LOOP_NAMES[c['loop']]} | {c['compile_seconds']:.1f} |"
        )
    return lines


def _ratio_table(ratios: dict[str, dict[str, Any]]) -> list[str]:
    """One row per ratio: its median over rounds (min–max), and the ratio of the best rounds."""
    lines = [
        "| ratio | median (min–max over rounds) | of best rounds |",
        "| --- | ---: | ---: |",
    ]
    for name, value in ratios.items():
        lines.append(
            f"| {name} | {value['median']:.3f} ({value['min']:.3f}–{value['max']:.3f}) "
            f"| {value['of_bests']:.3f} |"
        )
    return lines


def _rounded_rate(value: float) -> str:
    """Images per second as the table shows them: whole from 100 up, else 3 significant digits."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _with_si_prefix(value: float | None, unit: str) -> str:
    """`value` in `unit` with an SI prefix and 3 significant digits (1.23e9 -> "1.23 GFLOP"); None -> —."""
    if value is None:
        return "—"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
