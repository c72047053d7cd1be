"""Dynamic int8 quantization of a model's Linear layers: of an ONNX file, and of a PyTorch model.

Dynamic: each Linear's weight is stored as int8 (one scale per tensor), and its input is
quantized on the fly, batch by batch, from that batch's range. No calibration data is
needed, and the transformer's cost, which is nearly all in its Linear layers, runs
in int8 matmuls. The convolutions (the patch embedding, a hybrid's ResNet), the
LayerNorms and the softmax stay float32.

- `quantize_onnx`: onnxruntime's `quantize_dynamic` on the MatMul and Gemm nodes (the
  Linear layers; left to itself it would also quantize the convolutions).
- `quantize_torch`: `torch.ao.quantization.quantize_dynamic` on every `nn.Linear`. The
  speed paths of `vitlab.models.fast` call such a layer instead of reading its packed
  weight (`fast.is_int8`). torch.ao's int8 Linear keeps its weight in a TorchScript
  object that `torch.export` cannot trace (torch 2.14), so the int8 model of
  `format=pt2` is this eager module, measured but not written.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

# The ONNX nodes of a Linear layer, as torch.onnx writes them.
LINEAR_OPS = ("MatMul", "Gemm")


def quantize_onnx(source: Path, target: Path) -> Path:
    """Write `target`: the ONNX model `source` with its Linear layers in dynamic int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime suggests its shape-inference pre-pass on the root logger; the exported
    # graph already carries its shapes.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            source, target, op_types_to_quantize=list(LINEAR_OPS), weight_type=QuantType.QInt8
        )
    finally:
        root.setLevel(level)
    return target


def quantize_torch(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode, CPU) with every `nn.Linear` in dynamic int8; `model` is left as it is."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao points to torchao, which is not a dependency
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def serialized_size(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`: a PyTorch model's size on disk."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
