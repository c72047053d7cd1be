"""`bench(cfg)`: how fast a vitlab model trains and infers, against a bare PyTorch loop and timm.

The contenders run in one process, on one device, on the same synthetic data:

- `vitlab, Lightning fit`: the real `Trainer.fit` that `src/train.py` runs (the
  configured callbacks, logger, precision, gradient clipping and DataLoader). One
  fit runs the whole race: the other contenders take their turns between its
  turns, from a callback (`_FitTurns`), so the fit is timed in its steady state,
  as in a long training run, not in the slower first steps of a fresh fit.
- `vitlab, bare loop`: the same backbone with no framework: forward, cross-entropy,
  backward, the trainer's gradient clipping, the configured optimizer's step, on
  batches from the same DataLoader. Against the fit, this is Lightning's overhead.
- `timm ..., bare loop`: timm's model with the same architecture
  (`vitlab.bench.timm_models`) in that same loop. Against ours, this is the model code.
- inference of both models: eval mode, `torch.inference_mode`, one batch already
  on the device.

After `warmup_rounds` discarded rounds, the contenders take turns for `rounds`
rounds, in an order reversed every round (A B C, C B A, ...), so a machine that
slows down (a shared CPU) hits them alike and none always runs right after the
same neighbour (a training step leaves the allocator and the caches in another
state than an inference does).
A contender's round is `steps` timed steps (the fit's first step, which creates the
optimizer's state, is not timed). Throughput is the median over rounds; a ratio is the
median of the per-round ratios, which pairs measurements taken moments apart. On a
machine shared with other work, time stolen by others only ever slows a round down,
so the best round of each contender, and the ratio of the bests, are also reported.

FLOPs per image are counted on the meta device (`vitlab.training.flops.count_flops`), the
peak FLOP/s measured with a large matmul in the run's dtype; MFU = img/s x FLOPs per
image / peak. Peak memory is one step's highest allocation above what was allocated
when the step began: `torch.cuda.max_memory_allocated` on a GPU, and on a CPU the
allocations PyTorch's CPU allocator reports to `torch.profiler` (tensors only, not
the process's RSS). The report goes to `<run>/bench.md` and `<run>/bench.json`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_
from torch.optim import Optimizer
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from vitlab.runs.validate import check_run
from vitlab.errors import ConfigError
from vitlab.training.flops import count_flops, measure_peak_flops, precision_dtype
from vitlab.training.optim import build_optimizer
from vitlab.runs.tasks import compile_options, build_classifier, build_trainer, instantiate, prepare_run
from vitlab.bench.timm_models import timm_twin

log = logging.getLogger(__name__)

# What a contender runs: Lightning's fit, the bare training loop, or inference.
FIT, BARE, INFER = "fit", "bare", "infer"
LOOP_NAMES = {FIT: "Lightning fit", BARE: "bare loop", INFER: "inference"}


@dataclass(frozen=True)
class BenchSettings:
    """How long to measure: the `bench` node of `conf/bench.yaml`.

    Attributes:
        warmup_rounds: rounds run first and discarded.
        rounds: measured rounds; every contender runs once per round, in turn.
        steps: timed steps per contender and round (a fit runs one more, untimed).
        timm: race timm's model with the same architecture too.
        peak_matmul_size: side of the square matmul that measures the peak FLOP/s;
            None for `vitlab.training.flops.PEAK_MATMUL_SIZE` of the device.
    """

    warmup_rounds: int = 1
    rounds: int = 3
    steps: int = 3
    timm: bool = True
    peak_matmul_size: int | None = None

    def __post_init__(self) -> None:
        for key, minimum in (("warmup_rounds", 0), ("rounds", 1), ("steps", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"bench.{key}={value!r} must be an integer >= {minimum}")
        size = self.peak_matmul_size
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ConfigError(f"bench.peak_matmul_size={size!r} must be a positive integer or null")


@dataclass
class Contender:
    """One timed thing: `run(steps)` times `steps` steps and returns images per second.

    The Lightning fit has no `run`: it is one fit that runs the others between its
    turns (`_FitTurns`).

    Attributes:
        model: "vitlab" or "timm", whose model runs.
        loop: FIT, BARE or INFER.
        description: the model as the table names it.
    """

    model: str
    loop: str
    description: str
    run: Callable[[int], float] | None
    flops_per_image: float
    params: int
    peak_memory: float | None = None
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return max(self.samples)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], steps: int, images: int, device: torch.device) -> float:
    """Images per second over `steps` calls of `step` (warmed up by the caller)."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * images / (time.perf_counter() - start)


def peak_step_memory(step: Callable[[], None], device: torch.device) -> float | None:
    """Bytes: the highest allocation during one `step()` above what was allocated when it began.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the allocations and frees that
    PyTorch's CPU allocator reports to `torch.profiler` (profile_memory=True), summed
    in time order. Other devices: None.
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


class BareLoop:
    """A training loop with no framework, doing the arithmetic a Lightning step does.

    Forward (under autocast for a `-mixed` precision), cross-entropy on float32
    logits, backward (loss-scaled for 16-mixed), gradient clipping as the trainer
    configures it, optimizer step, `zero_grad(set_to_none=True)`. Batches come from
    `loader`, cycled; a `-true` precision casts the model and the images.

    Attributes:
        model: images -> logits, already on `device`.
        optimizer: the optimizer over `model`'s parameters.
        loader: yields `(images, labels)` batches on the host.
        device: where the model lives.
        precision: a Lightning precision ("32-true", "bf16-mixed", ...).
        clip_val: gradient clipping threshold, or None/0 for none.
        clip_algorithm: "norm" or "value", as `trainer.gradient_clip_algorithm`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        loader: DataLoader,
        device: torch.device,
        precision: str,
        clip_val: float | None = None,
        clip_algorithm: str = "norm",
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.device = device
        self.clip_val = clip_val
        self.clip = clip_grad_norm_ if clip_algorithm == "norm" else clip_grad_value_
        self.autocast = autocast_for(precision, device)
        self.input_dtype = input_dtype_for(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
        self._batches = self._cycle()

    def _cycle(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.loader

    def step(self) -> None:
        images, labels = next(self._batches)
        images = images.to(self.device, self.input_dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast:
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.scaler.scale(loss).backward()
        if self.clip_val:
            self.scaler.unscale_(self.optimizer)
            self.clip(self.model.parameters(), self.clip_val)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    """`torch.autocast` for a `-mixed` Lightning precision, else a no-op context."""
    if precision.endswith("-mixed"):
        return torch.autocast(device.type, dtype=precision_dtype(precision))
    return nullcontext()


def input_dtype_for(precision: str) -> torch.dtype:
    """The dtype of model and inputs: float32 unless the precision is `-true` (e.g. bf16-true)."""
    return precision_dtype(precision) if precision.endswith("-true") else torch.float32


class _FitTurns(L.Callback):
    """Drives the race from inside one long `Trainer.fit`: the fit's turn is `steps` of its batches.

    The race (`race`) is a generator that runs the other contenders and yields
    where the fit's turn comes. After the fit's first batch (untimed: the
    optimizer's state is created there) and after every `steps` batches from then
    on, this sends the fit's speed over its last turn (None the first time) and
    the race runs the others until the fit's next turn. A turn is timed from the
    moment the race hands back until the end of its last batch, after every other
    callback's hook: data loading, logging and callbacks included, as in training.
    When the race is over, the fit is told to stop.
    """

    def __init__(
        self,
        race: Generator[None, float | None, None],
        steps: int,
        batch: int,
        device: torch.device,
    ) -> None:
        self.race = race
        self.steps = steps
        self.batch = batch
        self.device = device
        self.finished = False
        self._start: float | None = None
        self._batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        _synchronize(self.device)
        self._batches += 1
        if self._start is None:
            self._hand_over(trainer, None)
        elif self._batches == self.steps:
            self._hand_over(trainer, self.steps * self.batch / (time.perf_counter() - self._start))

    def _hand_over(self, trainer: L.Trainer, speed: float | None) -> None:
        try:
            self.race.send(speed)
        except StopIteration:
            self.finished = True
            trainer.should_stop = True
        self._batches = 0
        _synchronize(self.device)
        self._start = time.perf_counter()


def _device(trainer_cfg: DictConfig) -> torch.device:
    """The one device the trainer config runs on; more than one is refused."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    if devices not in (1, "1", [0]) or nodes != 1:
        raise ConfigError(
            f"trainer.devices={devices!r}, trainer.num_nodes={nodes!r}: the benchmark measures "
            "one device; use trainer.devices=1 trainer.num_nodes=1"
        )
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    if accelerator in ("cpu", "auto"):
        return torch.device("cpu")
    raise ConfigError(
        f"trainer.accelerator={accelerator!r}: the benchmark runs on cpu, gpu, cuda or auto"
    )


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _optimizer(cfg: DictConfig, model: nn.Module) -> Optimizer:
    """The configured optimizer over `model`, with the parameter groups `ImageClassifier` uses."""
    return build_optimizer(instantiate(cfg.optimizer, "optimizer"), model)


def _model_name(cfg: DictConfig) -> str:
    """The `model=` choice (e.g. vit_s16) when Hydra composed the config, else the class name."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("model")
        if choice:
            return str(choice)
    return str(cfg.model.get("_target_", "model")).rsplit(".", 1)[-1]


def describe_machine(device: torch.device) -> dict[str, Any]:
    """CPU model and cores, the GPU if used, the load average, and the versions that matter."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    machine = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    machine["torch"] = torch.__version__  # with its build, e.g. 2.5.1+cu124
    for package in ("lightning", "timm"):
        try:
            machine[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            machine[package] = None
    return machine


def bench(cfg: DictConfig) -> dict[str, float]:
    """Measure the contenders (module docstring), write `bench.md` and `bench.json` into the
    run folder, print the table, and return the ratios."""
    settings = BenchSettings(**OmegaConf.to_container(cfg.bench, resolve=True))
    check_run(cfg)
    device = _device(cfg.trainer)
    precision = str(cfg.trainer.precision)
    try:
        dtype = precision_dtype(precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    twin, twin_name = (
        timm_twin(OmegaConf.to_container(cfg.model, resolve=True)) if settings.timm else (None, "")
    )
    prepare_run(cfg)

    classifier = build_classifier(cfg).to(device)
    backbone = classifier.backbone
    fit_data = instantiate(cfg.data, "data")
    bare_data = instantiate(cfg.data, "data")
    bare_data.setup("fit")
    images, _ = next(iter(bare_data.train_dataloader()))
    batch, shape = images.shape[0], tuple(images.shape)
    infer_images = images.to(device, input_dtype_for(precision))
    clip_val = cfg.trainer.get("gradient_clip_val")
    clip_algorithm = cfg.trainer.get("gradient_clip_algorithm") or "norm"

    def bare(model: nn.Module) -> BareLoop:
        if precision.endswith("-true"):
            model.to(dtype)
        return BareLoop(
            model,
            _optimizer(cfg, model),
            bare_data.train_dataloader(),
            device,
            precision,
            clip_val,
            clip_algorithm,
        )

    def infer_step(model: nn.Module) -> Callable[[], None]:
        autocast = autocast_for(precision, device)

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(infer_images)

        return step

    def infer_round(model: nn.Module) -> Callable[[int], float]:
        def run(steps: int) -> float:
            model.eval()
            try:
                return _timed(infer_step(model), steps, batch, device)
            finally:
                model.train()

        return run

    models = {"vitlab": (backbone, "vitlab")}
    if twin is not None:
        twin.to(device)
        options = compile_options(cfg.get("compile"))
        if options is not None:
            twin.compile(**options)
        if _param_count(twin) != _param_count(backbone):
            raise RuntimeError(
                f"{twin_name} has {_param_count(twin)} parameters, vitlab's model "
                f"{_param_count(backbone)}: not the same architecture, so no fair race"
            )
        models["timm"] = (twin, twin_name)

    contenders = [
        Contender(
            "vitlab",
            FIT,
            "vitlab",
            None,  # runs inside the one fit: see race() below
            count_flops(backbone, shape, train=True) / batch,
            _param_count(backbone),
        )
    ]
    for source, (model, description) in models.items():
        loop = bare(model)
        loop.step()  # the optimizer's state is created on its first step, not measured
        contenders.append(
            Contender(
                source,
                BARE,
                description,
                lambda steps, loop=loop: _timed(loop.step, steps, batch, device),
                count_flops(model, shape, train=True) / batch,
                _param_count(model),
                peak_step_memory(loop.step, device),
            )
        )
    for source, (model, description) in models.items():
        model.eval()
        infer_step(model)()
        memory = peak_step_memory(infer_step(model), device)
        model.train()
        contenders.append(
            Contender(
                source,
                INFER,
                description,
                infer_round(model),
                count_flops(model, shape, train=False) / batch,
                _param_count(model),
                memory,
            )
        )

    machine = describe_machine(device)
    peaks: list[float] = []

    def race() -> Generator[None, float | None, None]:
        """The rounds; a generator that yields where the fit's turn comes and is sent its speed."""
        for round_index in range(settings.warmup_rounds + settings.rounds):
            warmup = round_index < settings.warmup_rounds
            peaks.append(measure_peak_flops(device, dtype, settings.peak_matmul_size))
            # A B C, then C B A: each contender runs as often after a big training step as
            # after an inference (the allocator's and caches' state it inherits differ).
            for contender in contenders if round_index % 2 == 0 else contenders[::-1]:
                if contender.run is None:  # the fit: its turn is the fit's next steps
                    speed = yield
                else:
                    speed = contender.run(settings.steps)
                if not warmup:
                    contender.samples.append(speed)
                log.info(
                    "%s round %d: %s, %s: %.2f img/s",
                    "warm-up" if warmup else "measured",
                    round_index,
                    contender.description,
                    LOOP_NAMES[contender.loop],
                    speed,
                )

    # One fit for the whole race, the other contenders running between its turns: a
    # fit's first steps are slower than its later ones (a new optimizer, the
    # allocator filling up), and training is a long fit, so the fit is measured in
    # its steady state, as the bare loops are.
    turns = _FitTurns(race(), settings.steps, batch, device)
    max_steps = 1 + (settings.warmup_rounds + settings.rounds) * settings.steps
    # An epoch has at least one step, so max_epochs=max_steps never ends the fit first.
    trainer = build_trainer(cfg, max_epochs=max_steps, max_steps=max_steps)
    trainer.callbacks.append(turns)  # last: its turns include every other callback's hooks
    trainer.fit(classifier, datamodule=fit_data)
    if not turns.finished:
        raise RuntimeError(
            f"the fit stopped after {trainer.global_step} steps, before the benchmark's rounds "
            "were over; is a callback or trainer setting (max_time, early stopping) ending it?"
        )
    peak = max(peaks)
    machine["load_average_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    report = {
        "model": _model_name(cfg),
        "batch_size": batch,
        "input_shape": list(shape[1:]),
        "precision": precision,
        "compile": OmegaConf.to_container(cfg.compile)
        if OmegaConf.is_config(cfg.get("compile"))
        else cfg.get("compile"),
        "settings": asdict(settings),
        "machine": machine,
        "peak_flops": peak,
        "contenders": [
            {
                "model": c.model,
                "loop": c.loop,
                "description": c.description,
                "images_per_sec": c.median,
                "best_images_per_sec": c.best,
                "samples": c.samples,
                "flops_per_image": c.flops_per_image,
                "achieved_flops": c.median * c.flops_per_image,
                "mfu": c.median * c.flops_per_image / peak,
                "peak_memory_bytes": c.peak_memory,
                "params": c.params,
            }
            for c in contenders
        ],
        "ratios": _ratios(contenders),
    }
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_report(report)
    (output_dir / "bench.md").write_text(table)
    print(table)
    return {name: value["median"] for name, value in report["ratios"].items()}


# Each ratio: (model, loop) over (model, loop).
RATIOS = {
    "ours/timm train (bare loops)": (("vitlab", BARE), ("timm", BARE)),
    "ours/timm infer": (("vitlab", INFER), ("timm", INFER)),
    "Lightning fit / bare loop (ours)": (("vitlab", FIT), ("vitlab", BARE)),
    "ours in Lightning fit / timm bare loop": (("vitlab", FIT), ("timm", BARE)),
}


def _ratios(contenders: list[Contender]) -> dict[str, dict[str, Any]]:
    """Median, min and max over rounds of each round's ratio of two contenders (`RATIOS`),
    and the ratio of their best rounds."""
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


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def markdown_report(report: dict[str, Any]) -> str:
    """The benchmark's Markdown: what ran where, one row per contender, then the ratios."""
    machine = report["machine"]
    settings = report["settings"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cpu_cores']} cores"
    memory_note = (
        "torch.cuda.max_memory_allocated"
        if machine["device"].startswith("cuda")
        else "PyTorch CPU allocator, via torch.profiler; not RSS"
    )
    lines = [
        f"### {report['model']}: batch {report['batch_size']}, input "
        f"{'x'.join(map(str, report['input_shape']))}, {report['precision']}"
        + (f", compile={report['compile']}" if report["compile"] else ""),
        "",
        f"- Machine: {where} ({machine['device']}, {machine['torch_threads']} torch threads); "
        f"torch {machine['torch']}, lightning {machine['lightning']}, timm {machine['timm']}; "
        f"1-min load average {machine['load_average_1min']:.2f} before, "
        f"{machine['load_average_1min_after']:.2f} after.",
        f"- Peak: {_si(report['peak_flops'], 'FLOP/s')}, the best "
        f"{settings['peak_matmul_size'] or 'default'}² matmul in the run's dtype, measured "
        "in every round.",
        f"- Method: {settings['warmup_rounds']} warm-up round(s), then {settings['rounds']} rounds "
        f"of {settings['steps']} timed steps per contender, interleaved (the order reversed every "
        "round); medians over rounds "
        "(min–max in brackets); other processes only slow a round down, so the best round "
        "and the ratio of bests are the least disturbed.",
        f"- Peak memory: one step's highest allocation above its start ({memory_note}).",
        "",
        "| model | loop | img/s | FLOPs/img | achieved | MFU | peak memory | params |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in report["contenders"]:
        spread = f"{_number(min(c['samples']))}–{_number(max(c['samples']))}"
        memory = c["peak_memory_bytes"]
        lines.append(
            f"| {c['description']} | {LOOP_NAMES[c['loop']]} | {_number(c['images_per_sec'])} ({spread}) "
            f"| {_si(c['flops_per_image'], 'FLOP')} | {_si(c['achieved_flops'], 'FLOP/s')} "
            f"| {c['mfu']:.1%} | {'—' if memory is None else f'{memory / 2**20:.0f} MiB'} "
            f"| {c['params'] / 1e6:.2f} M |"
        )
    if report["ratios"]:
        lines += [
            "",
            "| ratio | median (min–max over rounds) | of best rounds |",
            "| --- | ---: | ---: |",
        ]
        for name, value in report["ratios"].items():
            lines.append(
                f"| {name} | {value['median']:.3f} ({value['min']:.3f}–{value['max']:.3f}) "
                f"| {value['of_bests']:.3f} |"
            )
    return "\n".join(lines) + "\n"
