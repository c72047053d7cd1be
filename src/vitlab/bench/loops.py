"""What a contender runs: a bare training loop or inference, and the record of its rounds.

The bare loops are the benchmark's yardsticks: the arithmetic of a Lightning
training step (or of an inference) with no framework around it, so that the
difference to the fit is Lightning's and the difference to timm is the model's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from vitlab.bench.machine import peak_step_memory
from vitlab.bench.matmul_bound import matmul_seconds
from vitlab.training.flops import precision_dtype, synchronize

# What a contender runs: Lightning's fit, the bare training loop, or inference.
FIT, BARE, INFER = "fit", "bare", "infer"
# The compiled contenders (`bench.compiled`): a compiled copy of a model in those two loops.
BARE_COMPILED, INFER_COMPILED = "bare_compiled", "infer_compiled"
LOOP_NAMES = {
    FIT: "Lightning fit",
    BARE: "bare loop",
    INFER: "inference",
    BARE_COMPILED: "bare loop, compiled",
    INFER_COMPILED: "inference, compiled",
}


@dataclass
class Contender:
    """One timed thing: `run(steps)` times `steps` steps and returns images per second.

    The Lightning fit has no `run`: it is one fit that runs the others between its
    turns (`vitlab.bench.race._FitTurns`).

    Attributes:
        model: "vitlab" or "timm", whose model runs.
        loop: FIT, BARE, INFER, or a compiled contender's BARE_COMPILED or INFER_COMPILED.
        description: the model as the table names it.
        run: `steps` -> images per second; None for the fit.
        flops_per_image: FLOPs of one step divided by the batch size.
        params: the model's parameter count.
        peak_memory: bytes, `vitlab.bench.machine.peak_step_memory`; None if not measured.
        compiled: whether the model runs compiled (a compiled contender, or any with `compile` on).
        compile_seconds: wall seconds of a compiled contender's untimed first call, its
            compile; None for an eager one, and for the fit (its first step is untimed
            inside the fit).
        matmul_time: `steps` -> a step's seconds in matmul kernels, measured when called
            (`vitlab.bench.matmul_bound.matmul_seconds`); None for the fit, whose
            step is the bare loop's inside Lightning.
        matmul_seconds: what `matmul_time` measured after the race; None until then, or
            where not measurable (off the CPU).
        samples: images per second, one per measured round.
    """

    model: str
    loop: str
    description: str
    run: Callable[[int], float] | None
    flops_per_image: float
    params: int
    peak_memory: float | None = None
    compiled: bool = False
    compile_seconds: float | None = None
    matmul_time: Callable[[int], float | None] | None = None
    matmul_seconds: float | None = None
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return max(self.samples)


def images_per_second(
    step: Callable[[], None], steps: int, images: int, device: torch.device
) -> float:
    """Images per second over `steps` calls of `step` (warmed up by the caller)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * images / (time.perf_counter() - start)


def seconds_of_one_call(step: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of one call of `step`, the device synchronized: a compiled model's first
    call, which compiles it, is measured with this, apart from the timed rounds."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    """`torch.autocast` for a `-mixed` Lightning precision, else a no-op context."""
    if precision.endswith("-mixed"):
        return torch.autocast(device.type, dtype=precision_dtype(precision))
    return nullcontext()


def input_dtype_for(precision: str) -> torch.dtype:
    """The dtype of model and inputs: float32 unless the precision is `-true` (e.g. bf16-true)."""
    return precision_dtype(precision) if precision.endswith("-true") else torch.float32


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


class InferenceLoop:
    """Inference as a deployment runs it: eval mode, `torch.inference_mode`, autocast for a
    `-mixed` precision, on one batch already on the device (no data loading timed).

    The model is in eval mode only while this runs, and back in train mode after,
    since the same model also trains in the race.

    Attributes:
        model: images -> logits, already on `device`.
        images: the batch, on `device`, in the input dtype.
        device: where the model lives.
    """

    def __init__(
        self, model: nn.Module, images: torch.Tensor, device: torch.device, precision: str
    ) -> None:
        self.model = model
        self.images = images
        self.device = device
        self.autocast = autocast_for(precision, device)

    def step(self) -> None:
        with torch.inference_mode(), self.autocast:
            self.model(self.images)

    @contextmanager
    def _in_eval_mode(self) -> Iterator[None]:
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def run(self, steps: int) -> float:
        """Images per second over `steps` forward passes."""
        with self._in_eval_mode():
            return images_per_second(self.step, steps, self.images.shape[0], self.device)

    def first_pass(self) -> float:
        """Seconds of one untimed pass: the warm-up, and a compiled model's inference compile."""
        with self._in_eval_mode():
            return seconds_of_one_call(self.step, self.device)

    def measure_memory(self) -> float | None:
        """`peak_step_memory` of one pass (None where not measurable); after `first_pass`."""
        with self._in_eval_mode():
            return peak_step_memory(self.step, self.device)

    def measure_matmul_seconds(self, steps: int) -> float | None:
        """`matmul_seconds` of a pass, over `steps` passes (None where not measurable)."""
        with self._in_eval_mode():
            return matmul_seconds(self.step, self.device, steps)

    def warm_up_and_measure_memory(self) -> float | None:
        """One untimed pass, then `peak_step_memory` of the next (None where not measurable)."""
        self.first_pass()
        return self.measure_memory()
