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
- compiled contenders (`bench.compiled`, when the run's `compile` is off): a copy of
  each model, made before any training step, under `torch.compile` with inductor's
  defaults, in the bare loop (its own optimizer) and in inference. With `compile` on,
  the contenders above are the compiled ones and none is added.

A compiled contender's untimed first call (a bare loop's first step, which compiles
forward and backward; inference's first pass) is its compile time, reported apart
from img/s: no timed round holds a compile.

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

FLOPs per image are counted on the meta device (`vitlab.training.flops.count_flops`; a
compiled contender's on its eager model), the
peak FLOP/s measured with a large matmul in the run's dtype; MFU = img/s x FLOPs per
image / peak. Peak memory is one step's highest allocation above what was allocated
when the step began (`vitlab.bench.machine.peak_step_memory`). The report goes to
`<run>/bench.md` and `<run>/bench.json` (`vitlab.bench.report`).

This module holds the race; the loops the contenders run are in `vitlab.bench.loops`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitlab.bench.loops import (
    BARE,
    BARE_COMPILED,
    FIT,
    INFER,
    INFER_COMPILED,
    LOOP_NAMES,
    BareLoop,
    Contender,
    InferenceLoop,
    images_per_second,
    input_dtype_for,
    seconds_of_one_call,
)
from vitlab.bench.machine import bench_device, describe_machine, load_average, peak_step_memory
from vitlab.bench.matmul_bound import matmul_seconds
from vitlab.bench.report import bench_report, write_report
from vitlab.bench.timm_models import timm_model
from vitlab.bounds import Count, NonNegativeInt
from vitlab.errors import ConfigError
from vitlab.models import fast
from vitlab.models.inductor import cpu_compile_problem
from vitlab.runs.build import (
    build_classifier,
    build_optimizer_factory,
    build_trainer,
    compile_options,
    instantiate,
)
from vitlab.runs.tasks import prepare_run
from vitlab.runs.validate import check_run
from vitlab.training.flops import count_flops, measure_peak_flops, precision_dtype, synchronize
from vitlab.training.optim import build_optimizer

log = logging.getLogger(__name__)


# What `src/bench.py` measures: this race, inference at several ToMe r (`token_merging.py`),
# or deployment latency in every runtime against timm's twin (`deploy.py`).
BenchTask = Literal["race", "token_merging", "deploy"]


@dataclass(frozen=True)
class BenchSettings:
    """How long to measure: the `bench` node of `conf/bench.yaml`.

    Attributes:
        task: "race" (this module), "token_merging" (`vitlab.bench.token_merging`) or
            "deploy" (`vitlab.bench.deploy`).
        warmup_rounds: rounds run first and discarded.
        rounds: measured rounds; every contender runs once per round, in turn.
        steps: timed steps per contender and round (a fit runs one more, untimed).
        timm: race timm's model with the same architecture too.
        compiled: with the run's `compile` off, also race a `torch.compile`d copy of each
            model in the bare loop and in inference (the compiled contenders).
        peak_matmul_size: side of the square matmul that measures the peak FLOP/s;
            None for `vitlab.training.flops.PEAK_MATMUL_SIZE` of the device.
        token_merging: the ToMe r that `task=token_merging` measures, one contender each.
    """

    task: BenchTask = "race"
    warmup_rounds: NonNegativeInt = 1
    rounds: Count = 3
    steps: Count = 3
    timm: bool = True
    compiled: bool = True
    peak_matmul_size: Count | None = None
    token_merging: Sequence[NonNegativeInt] = (0, 4, 8, 16)

    def __post_init__(self) -> None:
        if self.task not in get_args(BenchTask):
            raise ConfigError(f"bench.task={self.task!r} is not one of {list(get_args(BenchTask))}")
        for key, minimum in (("warmup_rounds", 0), ("rounds", 1), ("steps", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"bench.{key}={value!r} must be an integer >= {minimum}")
        size = self.peak_matmul_size
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ConfigError(f"bench.peak_matmul_size={size!r} must be a positive integer or null")
        r = self.token_merging
        if (
            isinstance(r, str)
            or not isinstance(r, Sequence)
            or not r
            or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in r)
            or len(set(r)) != len(r)
        ):
            raise ConfigError(
                f"bench.token_merging={r!r} must be a list of distinct integers >= 0 "
                "(tokens merged per block; 0 is the model without merging), e.g. [0, 4, 8, 16]"
            )

    @property
    def fit_steps(self) -> int:
        """The fit's steps: one untimed, then `steps` in every warm-up and measured round."""
        return 1 + (self.warmup_rounds + self.rounds) * self.steps


@dataclass(frozen=True)
class Workload:
    """What the bare loops and inference run on, shared by every contender but the fit.

    Attributes:
        device: the one device of the race.
        precision: the trainer's Lightning precision.
        data: a copy of the configured data module, set up for "fit": the bare loops' batches.
        images: its first batch on `device`, in the input dtype: the inference batch.
    """

    device: torch.device
    precision: str
    data: L.LightningDataModule
    images: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape)

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class Racer:
    """A model as the bare loop and inference race it.

    Attributes:
        source: "vitlab" or "timm", whose model it is.
        description: the model as the table names it.
        model: the module: the optimizer trains its parameters, its FLOPs are counted on it.
        run_as: what the loops call: `model` itself, or a `torch.compile` of it.
        compiled: whether `run_as` runs compiled (`compile` on, or a compiled contender).
        loops: its bare loop's and inference's names, (BARE, INFER) or a compiled
            contender's (BARE_COMPILED, INFER_COMPILED).
    """

    source: str
    description: str
    model: nn.Module
    run_as: nn.Module
    compiled: bool
    loops: tuple[str, str] = (BARE, INFER)


def bench(cfg: DictConfig) -> dict[str, float]:
    """Measure the contenders (module docstring), write `bench.md` and `bench.json` into the
    run folder, print the table, and return the ratios."""
    check_run(cfg)
    settings = BenchSettings(**OmegaConf.to_container(cfg.bench, resolve=True))
    device = bench_device(cfg.trainer)
    precision = str(cfg.trainer.precision)
    dtype = compute_dtype(precision)
    timm = timm_model(OmegaConf.to_container(cfg.model, resolve=True)) if settings.timm else None
    prepare_run(cfg)

    classifier = build_classifier(cfg).to(device)
    fit_data = instantiate(cfg.data, "data")
    workload = _workload(cfg, device, precision)
    ours = classifier.backbone
    compiled = compile_options(cfg.get("compile")) is not None
    racers = [Racer("vitlab", "vitlab", ours, ours, compiled)]
    if timm is not None:
        racers.append(_ready_to_race(*timm, ours, device, cfg.get("compile")))
    wants_compiled = settings.compiled and not compiled
    left_out = _compile_problem(device) if wants_compiled else None
    if wants_compiled and left_out is None:
        racers += [_compiled_copy(racer, ours) for racer in racers]
    contenders = _contenders(cfg, racers, workload)

    machine = describe_machine(device)
    race = Race(contenders, settings, device, dtype)
    _race_in_one_fit(cfg, classifier, fit_data, race, workload.batch_size)
    machine["load_average_1min_after"] = load_average()
    for contender in contenders:  # warmed up by the race: a round's steps each, profiled
        if contender.matmul_time is not None:
            contender.matmul_seconds = contender.matmul_time(settings.steps)

    report = bench_report(
        cfg, asdict(settings), workload.input_shape, machine, race.peak_flops, contenders, left_out
    )
    print(write_report(report, Path(cfg.paths.output_dir)))
    return {name: value["median"] for name, value in report["ratios"].items()}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the run's matmuls run in; a precision without one is a ConfigError."""
    try:
        return precision_dtype(precision)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _workload(cfg: DictConfig, device: torch.device, precision: str) -> Workload:
    """A second data module for the bare loops (the fit has its own), and its first batch."""
    data = instantiate(cfg.data, "data")
    data.setup("fit")
    images, _ = next(iter(data.train_dataloader()))
    return Workload(device, precision, data, images.to(device, input_dtype_for(precision)))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ready_to_race(
    model: nn.Module, description: str, ours: nn.Module, device: torch.device, compile_value: Any
) -> Racer:
    """timm's model on the device, compiled as ours is, its parameters counted against ours."""
    model.to(device)
    options = compile_options(compile_value)
    if options is not None:
        fast.choose_compiled_gelu(options, device.type == "cpu")
        model.compile(**options)
    _check_same_architecture(model, description, ours)
    return Racer("timm", description, model, model, options is not None)


def _compile_problem(device: torch.device) -> str | None:
    """Why inductor's defaults cannot compile on `device` here, also logged as a warning;
    None if they can. The compiled contenders are then left out rather than failing the
    race (`vitlab.models.inductor`)."""
    problem = cpu_compile_problem({}) if device.type == "cpu" else None
    if problem is not None:
        log.warning(
            "bench.compiled: %s. The compiled contenders are left out "
            "(bench.compiled=false leaves them out without this warning).",
            problem,
        )
    return problem


def _compiled_copy(racer: Racer, ours: nn.Module) -> Racer:
    """A compiled contender: a copy of `racer`'s eager model, made before any training step so
    that both start from the same weights, under `torch.compile` with inductor's defaults
    (`compile` is off, so it names no options). It compiles on its first call."""
    model = copy.deepcopy(racer.model)
    fast.choose_compiled_gelu({}, next(model.parameters()).device.type == "cpu")
    compiled = torch.compile(model)
    _check_same_architecture(compiled, racer.description, ours)
    return Racer(
        racer.source, racer.description, model, compiled, True, (BARE_COMPILED, INFER_COMPILED)
    )


def _check_same_architecture(model: nn.Module, description: str, ours: nn.Module) -> None:
    """A parameter count other than ours means another architecture: the race would not be fair."""
    if param_count(model) != param_count(ours):
        raise RuntimeError(
            f"{description} has {param_count(model)} parameters, vitlab's model "
            f"{param_count(ours)}: not the same architecture, so no fair race"
        )


def _contenders(cfg: DictConfig, racers: list[Racer], workload: Workload) -> list[Contender]:
    """Ours in the fit, then each racer (ours, timm's, their compiled copies) in the bare
    loop, then in inference.

    Each bare loop and inference runs once here, untimed (a compiled racer's compile),
    and once more to measure its peak memory.
    """
    ours = racers[0]
    fit = Contender(
        "vitlab",
        FIT,
        "vitlab",
        None,  # runs inside the one fit: `_race_in_one_fit`
        count_flops(ours.model, workload.input_shape, train=True) / workload.batch_size,
        param_count(ours.model),
        compiled=ours.compiled,
    )
    bare = [_bare_loop_contender(cfg, racer, workload) for racer in racers]
    infer = [_inference_contender(racer, workload) for racer in racers]
    return [fit, *bare, *infer]


def _bare_loop_contender(cfg: DictConfig, racer: Racer, workload: Workload) -> Contender:
    """`racer` in a `BareLoop` with the configured optimizer and gradient clipping."""
    model = racer.model
    if workload.precision.endswith("-true"):
        model.to(input_dtype_for(workload.precision))
    factory, layer_decay = build_optimizer_factory(cfg.optimizer)
    loop = BareLoop(
        racer.run_as,
        build_optimizer(factory, model, layer_decay),
        workload.data.train_dataloader(),
        workload.device,
        workload.precision,
        cfg.trainer.get("gradient_clip_val"),
        cfg.trainer.get("gradient_clip_algorithm") or "norm",
    )
    # Untimed: the optimizer's state is created on the first step, and a compiled model
    # compiles forward and backward there.
    first_step = seconds_of_one_call(loop.step, workload.device)
    return Contender(
        racer.source,
        racer.loops[0],
        racer.description,
        partial(images_per_second, loop.step, images=workload.batch_size, device=workload.device),
        count_flops(model, workload.input_shape, train=True) / workload.batch_size,
        param_count(model),
        peak_step_memory(loop.step, workload.device),
        compiled=racer.compiled,
        compile_seconds=first_step if racer.compiled else None,
        matmul_time=partial(matmul_seconds, loop.step, workload.device),
    )


def _inference_contender(racer: Racer, workload: Workload) -> Contender:
    """`racer` in an `InferenceLoop` on the workload's first batch."""
    loop = InferenceLoop(racer.run_as, workload.images, workload.device, workload.precision)
    first_pass = loop.first_pass()
    return Contender(
        racer.source,
        racer.loops[1],
        racer.description,
        loop.run,
        count_flops(racer.model, workload.input_shape, train=False) / workload.batch_size,
        param_count(racer.model),
        loop.measure_memory(),
        compiled=racer.compiled,
        compile_seconds=first_pass if racer.compiled else None,
        matmul_time=loop.measure_matmul_seconds,
    )


class Race:
    """The rounds, as a generator that yields where the fit's turn comes and is sent its speed.

    Every round first measures the peak FLOP/s (kept in `peak_flops`), then runs the
    contenders in turn: A B C, then C B A, so each runs as often after a big training
    step as after an inference (the allocator's and caches' state it inherits differ).
    Warm-up rounds are run and logged but not kept.
    """

    def __init__(
        self,
        contenders: list[Contender],
        settings: BenchSettings,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.contenders = contenders
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.peak_flops: list[float] = []

    def rounds(self) -> Generator[None, float | None, None]:
        settings = self.settings
        for round_index in range(settings.warmup_rounds + settings.rounds):
            warmup = round_index < settings.warmup_rounds
            self.peak_flops.append(
                measure_peak_flops(self.device, self.dtype, settings.peak_matmul_size)
            )
            for contender in self.contenders if round_index % 2 == 0 else self.contenders[::-1]:
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


def _race_in_one_fit(
    cfg: DictConfig,
    classifier: L.LightningModule,
    fit_data: L.LightningDataModule,
    race: Race,
    batch_size: int,
) -> None:
    """One `Trainer.fit` for the whole race, the other contenders running between its turns.

    A fit's first steps are slower than its later ones (a new optimizer, the allocator
    filling up), and training is a long fit, so the fit is measured in its steady
    state, as the bare loops are.
    """
    turns = _FitTurns(race.rounds(), race.settings.steps, batch_size, race.device)
    max_steps = race.settings.fit_steps
    # An epoch has at least one step, so max_epochs=max_steps never ends the fit first.
    trainer = build_trainer(cfg, max_epochs=max_steps, max_steps=max_steps)
    trainer.callbacks.append(turns)  # last: its turns include every other callback's hooks
    trainer.fit(classifier, datamodule=fit_data)
    if not turns.finished:
        raise RuntimeError(
            f"the fit stopped after {trainer.global_step} steps, before the benchmark's rounds "
            "were over; is a callback or trainer setting (max_time, early stopping) ending it?"
        )


class _FitTurns(L.Callback):
    """Drives the race from inside one long `Trainer.fit`: the fit's turn is `steps` of its batches.

    The race (`Race.rounds()`) is a generator that runs the other contenders and yields
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
        synchronize(self.device)
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
        synchronize(self.device)
        self._start = time.perf_counter()
