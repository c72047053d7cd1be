"""The speed paths, each named, each computing what a line of the reference path computes.

The models read as the papers write them (`layers.py`, `mixer.py`, `resnet.py`);
where a faster way exists, the reference code calls one function of this module
in one place, with the plain formulation beside the call. A reader may skip this
file and still read the whole model. `tests/test_fast_paths.py` checks each path
against its plain formulation, forward and backward.

- `class_token_block`: the last encoder block for the class token alone;
- `linear_gelu` (`fused_linear_gelu`, `gelu_in_place`): an MLP's first Dense and GELU;
- `token_mixing`: Mixer's token MLP without the transposed copies;
- `conv2d_padded`, `relu_in_place`: the ResNet stem's padding and ReLUs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

if TYPE_CHECKING:
    from vitlab.models.layers import Attention, Block, GeluApproximate, Mlp, Rotate


def class_token_block(
    block: Block, x: torch.Tensor, rotate: Rotate | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`block(x, rotate)[:, :1]`, (b, 1, d), computing only what the class token needs.

    The class-token classifier reads nothing else of the last block: its queries,
    output projection and MLP for the other tokens would be thrown away. Keys and
    values still come from every token. `bias` (b, 1, 1, n) is added to the
    attention logits (token merging's proportional attention, `tome.py`).
    """
    attended = class_token_attention(block.attn, block.norm1(x), rotate, bias)
    x = x[:, :1] + block.drop_path(block.drop(attended))
    return x + block.drop_path(block.mlp(block.norm2(x)))


def class_token_attention(
    attn: Attention, x: torch.Tensor, rotate: Rotate | None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`attn(x, rotate)[:, :1]`: the query of token 0 alone, projected from that token only.

    Token 0 is a prefix token, which every position encoding leaves unrotated
    (`pos_embed.py`), so only the keys are rotated. `bias` as in `Attention.attend`.
    """
    width = x.shape[-1]
    if is_int8(attn.qkv):  # its weight is packed: every query is projected, token 0's kept
        q, kv = attn.qkv(x).tensor_split([width], dim=-1)
        q = q[:, :1]
    else:
        q = F.linear(x[:, :1], attn.qkv.weight[:width], attn.qkv.bias[:width])
        kv = F.linear(x, attn.qkv.weight[width:], attn.qkv.bias[width:])
    q = rearrange(q, "b one (h d) -> b h one d", h=attn.num_heads)
    k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=attn.num_heads)
    x = attn.attend(q, k if rotate is None else rotate(k), v, bias)
    return attn.out(rearrange(x, "b h one d -> b one (h d)"))


def linear_gelu(x: torch.Tensor, linear: nn.Linear, act: nn.GELU) -> torch.Tensor:
    """`act(linear(x))`, an MLP's first Dense and its GELU, by the fastest way that applies.

    Without autograd on a CPU, one oneDNN kernel (`fused_linear_gelu`); otherwise
    `linear`, then the GELU, in place where autograd keeps nothing (`gelu_in_place`).
    """
    fused = fused_linear_gelu(x, linear, act.approximate)
    return gelu_in_place(linear(x), act) if fused is None else fused


def gelu_in_place(h: torch.Tensor, act: nn.GELU) -> torch.Tensor:
    """`act(h)` for a freshly computed `h`, written over `h` when autograd will not need it.

    Where no graph is recorded (`torch.no_grad`, `torch.inference_mode`, or `h`
    needing no grad) nothing keeps `h`, so the same GELU kernel writes its result
    over it: the MLP's widest buffer is not allocated twice, and the bits are the
    same. While training, backward needs `h`, so the GELU writes a new tensor.
    """
    if records_graph(h):
        return act(h)
    return torch.ops.aten.gelu_(h, approximate=act.approximate)


def records_graph(*inputs: torch.Tensor | None) -> bool:
    """Whether autograd records an op on `inputs`, i.e. keeps what its backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


_HAS_ONEDNN_LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def fused_linear_gelu(
    x: torch.Tensor, linear: nn.Linear, approximate: GeluApproximate
) -> torch.Tensor | None:
    """GELU(linear(x)) as one oneDNN matmul with GELU applied on its output, or None.

    PyTorch's own tanh-GELU kernel on a CPU is several times slower than its erf
    GELU, and the tanh form is the original's, which the published checkpoints
    need. oneDNN applies either form to the matmul's output while it is still in
    cache, nearly for free: the kernel `torch.compile` (Inductor) fuses a CPU Linear
    and GELU into, `torch.ops.mkldnn._linear_pointwise`. The same function to float
    rounding (another matmul kernel than `F.linear`'s).

    None where it does not apply, and the caller takes the plain path: when
    autograd would record the matmul (the op has no backward), off the CPU, for
    other dtypes than float32, under autocast (it is not autocast-aware), while
    `torch.compile` traces (Inductor fuses by itself) or `torch.export` does (the
    ONNX exporter traces with it, and ONNX has no such op: `is_compiling` is true
    for both), for an int8 Linear (`is_int8`), or in a PyTorch built
    without oneDNN or without the op. `x` may be a strided view: (..., in) ->
    (..., out), contiguous.
    """
    if (
        is_int8(linear)
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or records_graph(x, linear.weight, linear.bias)
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or not _HAS_ONEDNN_LINEAR_POINTWISE
    ):
        return None
    return torch.ops.mkldnn._linear_pointwise(
        x, linear.weight, linear.bias, "gelu", [], approximate
    )


def is_int8(linear: nn.Module) -> bool:
    """Whether `linear` is a dynamically quantized int8 Linear (`vitlab.deploy.quantize`),
    not an `nn.Linear`: its weight is packed, so the paths above that read a Linear's
    weight call the layer instead."""
    return not isinstance(linear, nn.Linear)


def token_mixing(mlp: Mlp, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`x + rearrange(mlp(rearrange(y, "b n c -> b c n")), "b c n -> b n c")` for y, x (b, n, c).

    Computed as W₂ GELU(W₁ y + b₁) + b₂ + x: the same weights and arithmetic, with
    the weights multiplied from the left, so no (b, c, n) transposed copy is made
    on the way in or out and the residual is added by the second matmul itself
    (`baddbmm`). Without autograd on a CPU, the first layer and its GELU are one
    oneDNN kernel (`fused_linear_gelu`) reading yᵀ as a strided view; its (b, c, t)
    output enters the second matmul transposed, again as a view. `mlp`'s dropout
    is not applied: Mixer's MLPs have none.
    """
    if is_int8(mlp.fc1) or is_int8(mlp.fc2):  # packed weights: the paper's formulation
        return x + rearrange(mlp(rearrange(y, "b n c -> b c n")), "b c n -> b n c")
    b, _, c = y.shape
    hidden = fused_linear_gelu(rearrange(y, "b n c -> b c n"), mlp.fc1, mlp.act.approximate)
    if hidden is None:
        w1 = repeat(mlp.fc1.weight, "t n -> b t n", b=b)  # broadcast views, no copies
        h = torch.baddbmm(repeat(mlp.fc1.bias, "t -> b t c", b=b, c=c), w1, y)
        hidden = gelu_in_place(h, mlp.act)
    else:
        hidden = rearrange(hidden, "b c t -> b t c")
    w2 = repeat(mlp.fc2.weight, "n t -> b n t", b=b)
    x = torch.baddbmm(x, w2, hidden)
    return x + rearrange(mlp.fc2.bias, "n -> n 1")


def conv2d_padded(
    x: torch.Tensor, weight: torch.Tensor, stride: int, pads: list[int]
) -> torch.Tensor:
    """`F.conv2d(F.pad(x, pads), weight, stride=stride)`, pads in `F.pad` order.

    Where the padding is symmetric the conv pads by itself, and no padded copy of
    the feature map is made.
    """
    left, right, top, bottom = pads
    if left == right and top == bottom:
        return F.conv2d(x, weight, stride=stride, padding=(top, left))
    return F.conv2d(F.pad(x, pads), weight, stride=stride)


def relu_in_place(x: torch.Tensor) -> torch.Tensor:
    """`F.relu(x)`, written over `x`: for a GroupNorm's output or a residual sum.

    Neither GroupNorm nor an addition keeps its output for backward, so the ReLU
    may overwrite it, and one feature map fewer is allocated.
    """
    return F.relu(x, inplace=True)
