"""How much of a step its matmuls take: the MFU a step would reach if nothing else took time.

MFU compares a step with the peak of one large square matmul. The step's own matmuls
(its Linear layers' shapes, the attention's small batched products) may run below that
peak on a given CPU, and no code around them can make them faster. So the benchmark
also times the matmul kernels inside its steps: their self time under `torch.profiler`
(a kernel's own time, without the ops it calls, such as `addmm`'s copy of its bias or the
zero-filled gradients of the fused attention's backward). FLOPs / that time / peak is
the step's matmul-bound MFU, its ceiling; MFU / ceiling is the share of the step spent
in matmuls, and the rest (GELU, LayerNorm, copies, the optimizer, Python) is what code
outside the matmuls could still win. The peak is a reference matmul, not the hardware's:
kernels that outrun it (oneDNN's convolutions on some CPUs) put the bound above 100%.

The kernels are the ops FLOPs are counted for (`torch.utils.flop_counter`, which
`vitlab.training.flops.count_flops` uses), with the CPU kernels they run as (oneDNN's
convolution, the CPU flash attention) and the oneDNN and MKL Linear kernels
that eager fast paths and Inductor call. CPU only: on a GPU the kernels' device time
would have to be read instead, and None is returned there.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import flop_registry

# The CPU kernels below the counted ops, and the fused Linear kernels of the fast paths
# and of Inductor (`mkldnn::_linear_pointwise` runs its GELU post-op inside the matmul).
CPU_MATMUL_KERNELS = frozenset(
    {
        "aten::mkldnn_convolution",
        "aten::_slow_conv2d_backward",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_addmm_activation",
        "mkldnn::_linear_pointwise",
        "mkl::_mkl_linear",
    }
)
# The counted ops as the profiler names them: `aten.mm` is "aten::mm".
MATMUL_KERNELS = CPU_MATMUL_KERNELS | {
    str(op).replace(".", "::", 1) for op in flop_registry if "." in str(op)
}


def is_matmul_kernel(name: str) -> bool:
    """Whether the profiler's op `name` ("aten::addmm") is a matmul-family kernel."""
    return name in MATMUL_KERNELS


def matmul_seconds(step: Callable[[], None], device: torch.device, steps: int = 1) -> float | None:
    """Seconds that a `step()` spends in matmul-family kernels (their self time under
    `torch.profiler`), averaged over `steps` calls; None off the CPU."""
    if device.type != "cpu":
        return None
    # Kineto would log "gpuGetDeviceCount failed" on a machine without a GPU: not an error here.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    microseconds = sum(
        event.self_cpu_time_total for event in prof.key_averages() if is_matmul_kernel(event.key)
    )
    return microseconds / 1e6 / steps


def matmul_bound_mfu(
    flops_per_step: float, seconds: float | None, peak_flops: float
) -> float | None:
    """The MFU of a step whose matmul kernels took `seconds` and nothing else any time;
    None where not measured, or where the step ran no matmul kernel."""
    if not seconds:
        return None
    return flops_per_step / seconds / peak_flops
