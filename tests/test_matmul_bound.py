"""The matmul-bound MFU: the matmul kernels' self time in one profiled step."""

import pytest
import torch
import torch.nn.functional as F

from vitlab.bench.matmul_bound import is_matmul_kernel, matmul_bound_mfu, matmul_seconds

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name",
    [
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::convolution_backward",
        "aten::mkldnn_convolution",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "mkldnn::_linear_pointwise",
    ],
)
def test_matmul_family_kernels_count(name):
    assert is_matmul_kernel(name)


@pytest.mark.parametrize(
    "name", ["aten::copy_", "aten::gelu", "aten::fill_", "aten::native_layer_norm", "aten::sum"]
)
def test_the_work_around_the_matmuls_does_not_count(name):
    assert not is_matmul_kernel(name)


def test_a_step_without_matmuls_spends_nothing_in_them():
    x = torch.randn(256, 256)
    assert matmul_seconds(lambda: F.gelu(x).sum(), CPU) == 0.0


def test_a_steps_matmuls_and_attention_are_timed():
    x, w = torch.randn(256, 128), torch.randn(64, 128)
    q = torch.randn(2, 3, 50, 16)
    assert matmul_seconds(lambda: F.linear(x, w), CPU) > 0
    assert matmul_seconds(lambda: F.scaled_dot_product_attention(q, q, q), CPU) > 0


def test_the_time_is_per_step_over_the_steps_profiled():
    calls = []
    x, w = torch.randn(256, 128), torch.randn(64, 128)
    assert matmul_seconds(lambda: calls.append(F.linear(x, w)), CPU, steps=3) > 0
    assert len(calls) == 3


def test_only_the_cpu_is_profiled():
    assert matmul_seconds(lambda: None, torch.device("meta")) is None


def test_the_bound_is_the_flops_over_the_matmul_time_and_the_peak():
    assert matmul_bound_mfu(8e9, 0.5, 20e9) == pytest.approx(0.8)
    assert matmul_bound_mfu(8e9, None, 20e9) is None
    assert matmul_bound_mfu(8e9, 0.0, 20e9) is None, "no matmul kernel ran"
