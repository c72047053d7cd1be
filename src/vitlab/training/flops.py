"""What model FLOP utilisation (MFU) divides: the FLOPs of a step, and the machine's peak FLOP/s.

FLOPs are counted by Lightning's `measure_flops` (`torch.utils.flop_counter.FlopCounterMode`)
on the meta device: the module's parameters and buffers are swapped for meta tensors of
the same shapes (`torch.func.functional_call`), so counting runs no arithmetic, allocates
nothing, draws no random numbers and leaves batch statistics and weights alone. Attention is
counted through SDPA's math kernel (two batched matmuls), the kernel-independent
count: FlopCounterMode has no formula for the fused CPU kernel and would count
attention as zero there. Matmuls and convolutions are counted; elementwise work
(norms, activations, softmax) is not, as is usual for MFU.

The peak is measured, not looked up: the best FLOP/s of a few large square matmuls
in the dtype the run computes in, on the same device. That is what this machine can
reach in that dtype right now (a shared CPU included), not a datasheet number. The
matmul grows from a small one only while it is quick: a dtype the CPU only emulates
(bfloat16 without AVX-512 BF16 or AMX) would otherwise take minutes on the largest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

# Lightning precision -> the dtype the matmuls run in ("mixed" autocasts them).
PRECISION_DTYPES = {
    "32-true": torch.float32,
    "32": torch.float32,
    "64-true": torch.float64,
    "64": torch.float64,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}
# Side of the square matmul that measures the peak: large enough to saturate the device.
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
# The side the search for it starts at, and the time one matmul may take before it stops growing.
FIRST_PEAK_MATMUL_SIZE, PEAK_MATMUL_SECONDS = 256, 0.05
_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def precision_dtype(precision: str | int) -> torch.dtype:
    """The matmul dtype of a Lightning `trainer.precision` value (e.g. "bf16-mixed" -> bfloat16).

    Raises ValueError for a precision plugin with no single dtype (e.g. transformer-engine).
    """
    key = str(precision)
    if key not in PRECISION_DTYPES:
        raise ValueError(
            f"trainer.precision={key!r} has no single compute dtype; known: {list(PRECISION_DTYPES)}"
        )
    return PRECISION_DTYPES[key]


def count_flops(module: nn.Module, input_shape: Sequence[int], train: bool = True) -> int:
    """FLOPs of one step of `module` on a batch of `input_shape` (batch dimension included).

    `train=True` counts forward, cross-entropy loss and backward (what a training step
    executes; with activation checkpointing the recomputed forward counts too), else
    the forward alone, without autograd (the inference path). The module keeps its mode
    (train/eval) and compiled modules are counted eagerly. Raises whatever the module
    raises on meta tensors (an op without a meta kernel, a `.item()` on data).
    Lightning's `measure_flops` wants a model built on the meta device; this counts a
    live module through meta copies of its tensors, with attention on SDPA's math kernel.
    """
    meta = {
        name: torch.empty_like(tensor, device="meta").requires_grad_(tensor.requires_grad)
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
    }
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    images = torch.empty(*input_shape, device="meta", dtype=dtype)
    labels = torch.zeros(input_shape[0], dtype=torch.long, device="meta")
    forward = partial(functional_call, module, meta, (images,))
    loss = (lambda logits: F.cross_entropy(logits.float(), labels)) if train else None
    autograd = nullcontext() if train else torch.no_grad()
    with autograd, sdpa_kernel(SDPBackend.MATH), torch.compiler.set_stance("force_eager"):
        return measure_flops(module, forward, loss)


def measure_peak_flops(
    device: torch.device | str, dtype: torch.dtype, size: int | None = None, repeats: int = 3
) -> float:
    """The best FLOP/s of `repeats` (size x size) @ (size x size) matmuls in `dtype` on `device`.

    `size` None: the side doubles from `FIRST_PEAK_MATMUL_SIZE` up to `PEAK_MATMUL_SIZE` of
    the device type while one matmul takes under `PEAK_MATMUL_SECONDS` (`peak_matmul_size`),
    so the measurement takes about a second whatever the dtype costs here. On a shared
    machine other processes lower it; `cached_peak_flops` measures once per process, the
    benchmark once per round and keeps the best.
    """
    device = torch.device(device)
    size = size or peak_matmul_size(device, dtype)
    a, b = _square_operands(device, dtype, size)
    best = float("inf")
    for _ in range(repeats + 1):  # one more: the first warms up
        best = min(best, _matmul_seconds(a, b, device))
    return 2 * size**3 / best


def peak_matmul_size(device: torch.device | str, dtype: torch.dtype) -> int:
    """The side of the matmul that measures the peak: the largest up to `PEAK_MATMUL_SIZE` whose
    predecessor (half the side, an eighth of the work) still took under `PEAK_MATMUL_SECONDS`."""
    device = torch.device(device)
    largest = PEAK_MATMUL_SIZE.get(device.type, 4096)
    size = min(FIRST_PEAK_MATMUL_SIZE, largest)
    while size < largest:
        a, b = _square_operands(device, dtype, size)
        _matmul_seconds(a, b, device)  # warm-up: the first call of a size pays for its setup
        if _matmul_seconds(a, b, device) >= PEAK_MATMUL_SECONDS:
            break
        size = min(2 * size, largest)
    return size


def _square_operands(
    device: torch.device, dtype: torch.dtype, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(0)  # the run's random stream stays untouched
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    return a, b


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    synchronize(device)
    return time.perf_counter() - start


def cached_peak_flops(device: torch.device | str, dtype: torch.dtype) -> float:
    """`measure_peak_flops(device, dtype)`, measured once per process and remembered, so a
    callback that asks in every run (or every test) pays for it once."""
    key = (str(torch.device(device)), dtype)
    if key not in _PEAKS:
        _PEAKS[key] = measure_peak_flops(device, dtype)
    return _PEAKS[key]


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued kernels (CUDA runs them asynchronously), so a timer reads their end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
