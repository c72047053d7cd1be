"""The speed paths, each named, each computing what a line of the reference path computes.

The models read as the papers write them (`layers.py`, `mixer.py`, `resnet.py`);
where a faster way exists, the reference code calls one function of this module
in one place, with the plain formulation beside the call. A reader may skip this
file and still read the whole model. `tests/test_fast_paths.py` checks each path
against its plain formulation, forward and backward.

- `class_token_block`: the last encoder block for the class token alone;
- `linear_gelu` (`fused_linear_gelu`, `gelu_in_place`): an MLP's first Dense and GELU;
- `linear` (`onednn_linear`): a Dense by oneDNN's matmul, the bias inside it;
- `gelu` (`tanh_gelu`): the tanh GELU as x·σ(2u), PyTorch's GELU kernel's tanh being slow
  on some CPUs; while training, with its derivative kept for backward
  (`tanh_gelu_and_derivative`); on large tensors, by Inductor's fused loop of it called
  from eager code (`tanh_gelu_loop`, and `tanh_gelu_loop_` in place without autograd);
- `token_mixing`: Mixer's token MLP without the transposed copies;
- `conv2d_padded`, `relu_in_place`: the ResNet stem's padding and ReLUs.

Where the faster way depends on the CPU (the oneDNN kernels, the sigmoid-form
GELU, Inductor's GELU loop), it is taken only where it measured faster on this machine
(`kernel_choice.choose`, once per machine and kernel, cached): elsewhere the plain
formulation runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from functools import cache, partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vitlab.models.inductor import cpu_compiler, uses_inductor
from vitlab.models.kernel_choice import choose, chosen

if TYPE_CHECKING:
    from vitlab.models.layers import Attention, Block, GeluApproximate, Mlp, Rotate

log = logging.getLogger(__name__)


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
    k, v = attn.split_heads(kv, parts=2)
    x = attn.attend(q, k if rotate is None else rotate(k), v, bias)
    return attn.out(rearrange(x, "b h one d -> b one (h d)"))


def linear_gelu(x: torch.Tensor, layer: nn.Linear, act: nn.GELU) -> torch.Tensor:
    """`act(layer(x))`, an MLP's first Dense and its GELU, by the fastest way that applies.

    Without autograd on a CPU, one oneDNN kernel (`fused_linear_gelu`) where it measured
    faster than the next way on this machine; otherwise the Dense (`linear`), then the
    GELU, in place where autograd keeps nothing (`gelu_in_place`).
    """
    if fused_linear_gelu_applies(x, layer) and _fused_wins(layer, act.approximate):
        return fused_linear_gelu(x, layer, act.approximate)
    return gelu_in_place(linear(x, layer), act)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer(x)`, by oneDNN's matmul (`onednn_linear`) where that measured faster than
    `F.linear` for this layer's shape on this machine, training and inference measured apart.

    On a CPU `F.linear` is MKL's matmul after a copy of the bias into its output;
    oneDNN adds the bias inside its matmul, and on some CPUs its matmul is the faster.
    """
    if onednn_linear_applies(x, layer):
        training = records_graph(x, layer.weight, layer.bias)
        if _onednn_linear_wins(layer, training):
            return onednn_linear(x, layer)
    return layer(x)


def onednn_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`F.linear(x, layer.weight, layer.bias)` as oneDNN's matmul with the bias in it
    (`torch.ops.mkldnn._linear_pointwise`, the kernel Inductor calls for a CPU Linear), with
    autograd: backward is `F.linear`'s, two matmuls and the bias's sum. The same function
    to float rounding. Only where `onednn_linear_applies`; (..., in) -> (..., out)."""
    if records_graph(x, layer.weight, layer.bias):
        return _OneDnnLinear.apply(x, layer.weight, layer.bias)
    return _onednn_matmul(x, layer.weight, layer.bias)


def _onednn_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """oneDNN's Linear forward; the backward autograd gives `F.linear`."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        rows = rearrange(grad, "... o -> (...) o")
        grad_x = grad @ weight if needs_x else None  # (..., o) (o, i) -> (..., i)
        grad_weight = rows.mT @ rearrange(x, "... i -> (...) i") if needs_weight else None
        grad_bias = rows.sum(0) if needs_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


def onednn_linear_applies(x: torch.Tensor, layer: nn.Module) -> bool:
    """Whether `onednn_linear` can run: a float32 `nn.Linear` (not an int8 one, `is_int8`)
    on the CPU, outside autocast (the op is not autocast-aware), in eager code (while
    `torch.compile`, `torch.export` or the TorchScript tracer record a graph, it keeps
    `F.linear`: Inductor picks its own kernel, and ONNX has no such op), in a PyTorch
    built with oneDNN and the op."""
    return not (
        is_int8(layer)
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or layer.weight.dtype != torch.float32
        or x.dim() < 2
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or not _HAS_ONEDNN_LINEAR_POINTWISE
    )


def _onednn_linear_wins(layer: nn.Linear, training: bool) -> bool:
    """Whether oneDNN's matmul beat `F.linear` for this layer's shape here, with autograd
    recording when `training` (measured on 1024 rows).

    Only the forward is timed: the backward is the same two matmuls and sum either way
    (`_OneDnnLinear.backward` is `F.linear`'s), and timing it too would dilute the
    forward's difference under the margin.
    """
    out_features, in_features = layer.weight.shape
    kernel = f"linear_onednn_{'train' if training else 'infer'}/{in_features}x{out_features}"
    candidates = partial(
        _onednn_linear_candidates, in_features, out_features, layer.bias is not None, training
    )
    with torch.autograd.set_grad_enabled(training), torch.autocast("cpu", enabled=False):
        return choose(f"{kernel}/cpu/float32", candidates, "plain") == "onednn"


def _onednn_linear_candidates(
    in_features: int, out_features: int, has_bias: bool, training: bool
) -> dict[str, Callable[[], object]]:
    x, weight = _sample((1024, in_features)), _weight_sample(out_features, in_features)
    bias = _sample((out_features,)) if has_bias else None
    for t in (x, weight, bias):
        if t is not None:
            t.requires_grad_(training)
    onednn = _OneDnnLinear.apply if training else _onednn_matmul
    return {"plain": lambda: F.linear(x, weight, bias), "onednn": lambda: onednn(x, weight, bias)}


def gelu_in_place(h: torch.Tensor, act: nn.GELU) -> torch.Tensor:
    """`act(h)` for a freshly computed `h`, written over `h` when autograd will not need it.

    Where no graph is recorded (`torch.no_grad`, `torch.inference_mode`, or `h`
    needing no grad) nothing keeps `h`, so the GELU writes its result over it: the
    MLP's widest buffer is not allocated twice. While training, backward needs `h`,
    so the GELU writes a new tensor (`gelu`). The tanh GELU of a large `h` runs as
    Inductor's loop, in place too (`tanh_gelu_loop_`), where that measured faster here.
    """
    if records_graph(h) or _traced_for_a_cpu(h):
        return gelu(h, act)
    if act.approximate == "tanh" and _tanh_gelu_applies(h):
        if _gelu_loop_applies(h) and _gelu_loop_wins(in_place=True):
            return tanh_gelu_loop_(h)
        return _eager_tanh_gelu_(h)
    return torch.ops.aten.gelu_(h, approximate=act.approximate)


def _eager_tanh_gelu_(h: torch.Tensor) -> torch.Tensor:
    """The tanh GELU written over `h` by the eager kernel chosen here, the sigmoid form or
    PyTorch's; no autograd."""
    if _tanh_gelu_wins("forward"):
        return tanh_gelu(h, out=h)
    return torch.ops.aten.gelu_(h, approximate="tanh")


def gelu(h: torch.Tensor, act: nn.GELU) -> torch.Tensor:
    """`act(h)`, the tanh form as x·σ(2u) (`tanh_gelu`) in each direction where that
    measured faster than PyTorch's GELU kernel on this machine; while training, where
    it measured faster here, the forward also keeps the GELU's derivative for backward
    (`tanh_gelu_and_derivative`) in place of its input, or, for a large `h`, Inductor's
    loop of the sigmoid form runs both ways (`tanh_gelu_loop`).

    While `torch.compile` traces for a CPU, the tanh form is written as x·σ(2u) in
    plain ops (`tanh_gelu_formula`), which Inductor fuses into one loop, where the
    sigmoid form won here (`_compiled_tanh_gelu_wins`).
    """
    if act.approximate == "tanh" and _traced_for_a_cpu(h):
        return tanh_gelu_formula(h) if _compiled_tanh_gelu_wins() else act(h)
    if act.approximate == "tanh" and _tanh_gelu_applies(h):
        if records_graph(h) and _gelu_loop_applies(h) and _gelu_loop_wins(in_place=False):
            return tanh_gelu_loop(h)
        return _eager_tanh_gelu(h, act)
    return act(h)


def _eager_tanh_gelu(h: torch.Tensor, act: nn.GELU) -> torch.Tensor:
    """`act(h)` by the eager kernels chosen here: the sigmoid form in either direction,
    the kept derivative while training, or PyTorch's GELU."""
    if records_graph(h) and _saved_derivative_wins():
        return _TanhGeluSavingDerivative.apply(h)
    forward, backward = _tanh_gelu_wins("forward"), _tanh_gelu_wins("backward")
    if forward or backward:
        return _TanhGelu.apply(h, forward, backward)
    return act(h)


# The tanh GELU 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x³), is x σ(2u), and
# 2u = x (C1 + C2 x²): sigmoid's kernel (an exp) is cheaper than tanh's on some CPUs.
_C1 = 2 * math.sqrt(2 / math.pi)
_C2 = _C1 * 0.044715
# Elements per pass: each chunk's few elementwise passes run while it is in cache.
GELU_CHUNK = 1 << 20


def _chunks(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The matching `GELU_CHUNK`-element pieces of contiguous tensors of one size, as views."""
    return zip(*(t.view(-1).split(GELU_CHUNK) for t in tensors), strict=True)


def _sigmoid_v(xs: torch.Tensor, c1: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """σ(v), v = x (C1 + C2 x²), of one chunk `xs`, written into `out`."""
    return torch.addcmul(c1, xs, xs, value=_C2, out=out).mul_(xs).sigmoid_()


def _derivative(
    xs: torch.Tensor, s: torch.Tensor, c1: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """d/dx x σ(v) = σ(v) (1 + x (C1 + 3 C2 x²) (1 − σ(v))) of one chunk, s = σ(v), into `out`."""
    k = torch.addcmul(c1, xs, xs, value=3 * _C2, out=out).mul_(xs)  # x (C1 + 3 C2 x²)
    return k.addcmul_(k, s, value=-1).add_(1).mul_(s)


def tanh_gelu_formula(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` as x·σ(x (C1 + C2 x²)) in plain ops, for a compiler
    to fuse (eager, each op would be a pass over memory: `tanh_gelu` chunks them).

    C1 and C2 are written out: with dynamic shapes Dynamo makes a module's float (`_C1`)
    an input of the graph, and Inductor built `tanh_gelu_loop`'s loop that read them for one
    thread.
    """
    return x * torch.sigmoid(x * (1.5957691216057308 + 0.07135481627260025 * x * x))


# Below this many elements a GELU keeps the eager kernels: the loop's compile, once a
# process, would cost more than the loop saves in a short run of a small model.
GELU_LOOP_MIN = 1 << 20


def tanh_gelu_loop(x: torch.Tensor) -> torch.Tensor:
    """`tanh_gelu_formula(x)` by Inductor's one fused loop each way, called from eager code.

    Where PyTorch's tanh GELU kernel is slow, eager code can only chunk the sigmoid
    form's passes (`tanh_gelu`); a compiled loop makes one pass forward and one backward,
    with an exp for the tanh. Compiled once a process, for every size (a flat view with a
    dynamic length). `x` must be contiguous.
    """
    return _compiled_tanh_gelu_formula()(x.view(-1)).view(x.shape)


def tanh_gelu_loop_(x: torch.Tensor) -> torch.Tensor:
    """`tanh_gelu_loop` written over `x` (one loop, reading and writing `x`); no autograd."""
    _compiled_tanh_gelu_formula(in_place=True)(x.view(-1))
    return x


@cache
def _compiled_tanh_gelu_formula(in_place: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(_tanh_gelu_formula_ if in_place else tanh_gelu_formula, dynamic=True)


def _tanh_gelu_formula_(x: torch.Tensor) -> torch.Tensor:
    return x.copy_(tanh_gelu_formula(x))


def tanh_gelu(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` as x·σ(x (C1 + C2 x²)), chunk by chunk; no autograd.

    The same function to float rounding. `out` may be `x` itself (in place).
    `x` must be contiguous.
    """
    out = torch.empty_like(x) if out is None else out
    c1 = x.new_tensor(_C1)
    scratch = x.new_empty(min(GELU_CHUNK, x.numel()))
    for xs, outs in _chunks(x, out):
        torch.mul(xs, _sigmoid_v(xs, c1, scratch[: xs.numel()]), out=outs)
    return out


def tanh_gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU's input gradient, `grad` · d/dx x σ(v), v = x (C1 + C2 x²), chunked.

    d/dx x σ(v) = σ(v) (1 + x (C1 + 3 C2 x²) (1 − σ(v))). Both must be contiguous.
    """
    out = torch.empty_like(x)
    c1 = x.new_tensor(_C1)
    scratch = x.new_empty(min(GELU_CHUNK, x.numel()))
    for xs, gs, outs in _chunks(x, grad, out):
        _derivative(xs, _sigmoid_v(xs, c1, scratch[: xs.numel()]), c1, outs).mul_(gs)
    return out


def tanh_gelu_and_derivative(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`tanh_gelu(x)` and its derivative σ(v) (1 + x (C1 + 3 C2 x²) (1 − σ(v))), chunked.

    Computed together while each chunk of `x` is in cache, so that backward is one
    multiplication (`grad` · derivative) instead of the derivative's arithmetic on a
    tensor long out of cache; the derivative takes the memory `x` would have taken
    in autograd's saved tensors. `x` must be contiguous.
    """
    out, derivative = torch.empty_like(x), torch.empty_like(x)
    c1 = x.new_tensor(_C1)
    scratch = x.new_empty(min(GELU_CHUNK, x.numel()))
    for xs, outs, ds in _chunks(x, out, derivative):
        s = _sigmoid_v(xs, c1, scratch[: xs.numel()])
        torch.mul(xs, s, out=outs)
        _derivative(xs, s, c1, ds)
    return out, derivative


class _TanhGeluSavingDerivative(torch.autograd.Function):
    """The tanh GELU keeping its derivative for backward, not its input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, derivative = tanh_gelu_and_derivative(x)
        ctx.save_for_backward(derivative)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (derivative,) = ctx.saved_tensors
        return grad * derivative


class _TanhGelu(torch.autograd.Function):
    """The tanh GELU with each direction by `tanh_gelu` or by PyTorch's kernel, as chosen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, by_sigmoid: bool, backward_by_sigmoid: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.backward_by_sigmoid = backward_by_sigmoid
        return tanh_gelu(x) if by_sigmoid else F.gelu(x, approximate="tanh")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        if ctx.backward_by_sigmoid:
            return tanh_gelu_backward(grad.contiguous(), x), None, None
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh"), None, None


def _tanh_gelu_applies(x: torch.Tensor) -> bool:
    """The sigmoid form is a CPU float32 path of eager PyTorch (Inductor and the exporters
    trace the plain GELU, which they fuse or translate by themselves)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _traced_for_a_cpu(x: torch.Tensor) -> bool:
    """Whether `torch.compile` is tracing a CPU float32 graph (not `torch.export`, whose
    graph goes to other runtimes: it keeps PyTorch's GELU op)."""
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
    )


# The choice of the form a CPU float32 graph's tanh GELU takes under `torch.compile`.
COMPILED_GELU = "tanh_gelu_compiled/cpu/float32"


def choose_compiled_gelu(options: Mapping[str, Any] | None = None, on_cpu: bool = True) -> bool:
    """Time Inductor's loops for PyTorch's tanh GELU and for `tanh_gelu_formula`, forward
    and backward, and keep the faster for the graphs traced afterwards; True: the formula.

    The loops cannot be compiled while a model's graph is being traced, so vitlab calls
    this before it compiles a model (`train.py`'s `compile`, the benchmark's compiled
    contenders) with the `torch.compile` keywords it will use, and whether the model runs
    on the CPU. It measures once per machine (cached), compiling two small functions;
    nothing for a model on another device, where the compile will not use Inductor, or
    where Inductor finds no C++ compiler (the eager rule then decides, should a CPU graph
    ask).
    """
    if not (on_cpu and uses_inductor(options or {}) and cpu_compiler() is not None):
        return _compiled_tanh_gelu_wins()
    with torch.autocast("cpu", enabled=False):
        return choose(COMPILED_GELU, _compiled_gelu_candidates, "torch") == "sigmoid"


def _compiled_gelu_candidates() -> dict[str, Callable[[], object]]:
    x, grad = _sample((1 << 22,)).requires_grad_(), _sample((1 << 22,), seed=1)
    return {
        name: _forward_and_backward(torch.compile(form, dynamic=False), x, grad)
        for name, form in (
            ("torch", partial(F.gelu, approximate="tanh")),
            ("sigmoid", tanh_gelu_formula),
        )
    }


def _forward_and_backward(
    form: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor
) -> Callable[[], None]:
    """A candidate's call: `form(x)` and its backward with autograd on, `x`'s grad dropped."""

    def run() -> None:
        with torch.enable_grad():
            form(x).backward(grad)
        x.grad = None

    return run


@torch.compiler.assume_constant_result
def _compiled_tanh_gelu_wins() -> bool:
    """Whether the traced graph takes `tanh_gelu_formula`: where its compiled loop beat
    Inductor's own GELU loop here (`choose_compiled_gelu`, measured before the compile).

    Where nothing measured the compiled loops (a model compiled by other code than
    vitlab's), the eager measurement decides, and only one way: the eager sigmoid form
    makes four passes over memory where the tanh kernel makes one, so where it still
    wins, tanh's arithmetic costs more than exp's, and the fused loop of each makes one
    pass. The compiler calls this while tracing and keeps its answer as a constant.
    """
    choice = chosen(COMPILED_GELU)
    return choice == "sigmoid" if choice is not None else _tanh_gelu_wins("forward")


def _tanh_gelu_wins(direction: str) -> bool:
    """Whether `tanh_gelu` (forward) or `tanh_gelu_backward` beat PyTorch's kernel here."""
    kernel = f"tanh_gelu_{direction}/cpu/float32"
    return _measured(kernel, partial(_tanh_gelu_candidates, direction), "torch") == "sigmoid"


# The choice between recomputing the GELU's derivative in backward and keeping it.
SAVED_DERIVATIVE = "tanh_gelu_saved_derivative/cpu/float32"


def _saved_derivative_wins() -> bool:
    """Whether a forward keeping the derivative (`tanh_gelu_and_derivative`) and a backward
    multiplying by it beat the forward and backward chosen above, together, here."""
    return _measured(SAVED_DERIVATIVE, _saved_derivative_candidates, "recompute") == "saved"


def _saved_derivative_candidates() -> dict[str, Callable[[], object]]:
    # The pair it competes with: each direction's own candidate, as chosen (measured first).
    forward, backward = (
        _tanh_gelu_candidates(direction)["sigmoid" if _tanh_gelu_wins(direction) else "torch"]
        for direction in ("forward", "backward")
    )
    x, grad = _sample((1 << 22,)), _sample((1 << 22,), seed=1)

    def recompute() -> None:
        forward()
        backward()

    def saved() -> None:
        _, derivative = tanh_gelu_and_derivative(x)
        grad * derivative

    return {"recompute": recompute, "saved": saved}


# The choices between the eager kernels chosen above and Inductor's loop: while training,
# and without autograd (in place).
GELU_LOOP = "tanh_gelu_inductor_loop/cpu/float32"
GELU_LOOP_IN_PLACE = "tanh_gelu_inductor_loop_in_place/cpu/float32"
# Set where the loop failed to build or run in this process: the eager kernels from then on.
_gelu_loop_failed = False


def _gelu_loop_applies(x: torch.Tensor) -> bool:
    """Whether Inductor's loop may serve the tanh GELU of `x` (`tanh_gelu_loop`, or
    `tanh_gelu_loop_` in place): `GELU_LOOP_MIN` elements or more, a C++ compiler for
    Inductor, and `torch.compile` not turned off
    (`TORCH_COMPILE_DISABLE=1`, where the "loop" would be the formula's eager passes)."""
    return (
        x.numel() >= GELU_LOOP_MIN
        and not _gelu_loop_failed
        and not torch._dynamo.config.disable
        and cpu_compiler() is not None
    )


def _gelu_loop_wins(in_place: bool) -> bool:
    """Whether Inductor's loop beat the eager kernels chosen here on this machine: forward
    and backward with autograd, as training runs them (`tanh_gelu_loop` against
    `_eager_tanh_gelu`), or, `in_place`, the forward written over its input without
    autograd (`tanh_gelu_loop_` against `_eager_tanh_gelu_`).

    The first measurement compiles the loop. Where that compile or call fails, the eager
    kernels serve, with a warning.
    """
    global _gelu_loop_failed
    kernel = GELU_LOOP_IN_PLACE if in_place else GELU_LOOP
    choice = chosen(kernel)
    if choice is None:
        candidates = _gelu_loop_in_place_candidates if in_place else _gelu_loop_candidates
        try:
            with (
                torch.autograd.set_grad_enabled(not in_place),
                torch.autocast("cpu", enabled=False),
            ):
                choice = choose(kernel, candidates, "eager")
        except Exception as err:  # whatever the compiler raised: the eager kernels
            _gelu_loop_failed = True
            log.warning("Inductor's tanh GELU loop failed (%s): the eager GELU kernels serve", err)
            return False
    return choice == "loop"


def _gelu_loop_candidates() -> dict[str, Callable[[], object]]:
    x, grad = _sample((1 << 22,)).requires_grad_(), _sample((1 << 22,), seed=1)
    act = nn.GELU(approximate="tanh")
    _eager_tanh_gelu(x, act)  # the eager kernels' own choices, measured first
    return {
        "eager": _forward_and_backward(partial(_eager_tanh_gelu, act=act), x, grad),
        "loop": _forward_and_backward(tanh_gelu_loop, x, grad),
    }


def _gelu_loop_in_place_candidates() -> dict[str, Callable[[], object]]:
    x = _sample((1 << 22,))
    work = torch.empty_like(x)  # each call writes over a fresh copy of the sample
    _eager_tanh_gelu_(work.copy_(x))  # the eager kernel's own choice, measured first
    return {
        "eager": lambda: _eager_tanh_gelu_(work.copy_(x)),
        "loop": lambda: tanh_gelu_loop_(work.copy_(x)),
    }


def _tanh_gelu_candidates(direction: str) -> dict[str, Callable[[], object]]:
    x, grad = _sample((1 << 22,)), _sample((1 << 22,), seed=1)
    if direction == "forward":
        return {"torch": lambda: F.gelu(x, approximate="tanh"), "sigmoid": lambda: tanh_gelu(x)}
    return {
        "torch": lambda: torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
        "sigmoid": lambda: tanh_gelu_backward(grad, x),
    }


def _fused_wins(linear: nn.Linear, approximate: GeluApproximate) -> bool:
    """Whether the fused oneDNN Linear + GELU beat the Linear then the GELU for this
    layer's shape here (measured on 1024 rows)."""
    out_features, in_features = linear.weight.shape
    key = f"linear_gelu_{approximate}/{in_features}x{out_features}/cpu/float32"
    candidates = partial(
        _linear_gelu_candidates, in_features, out_features, linear.bias is not None, approximate
    )
    return _measured(key, candidates, "plain") == "fused"


def _linear_gelu_candidates(
    in_features: int, out_features: int, has_bias: bool, approximate: GeluApproximate
) -> dict[str, Callable[[], object]]:
    x, weight = _sample((1024, in_features)), _weight_sample(out_features, in_features)
    bias = _sample((out_features,)) if has_bias else None
    act = nn.GELU(approximate=approximate)
    return {
        "plain": lambda: gelu_in_place(F.linear(x, weight, bias), act),
        "fused": lambda: torch.ops.mkldnn._linear_pointwise(
            x, weight, bias, "gelu", [], approximate
        ),
    }


def _measured(
    kernel: str, candidates: Callable[[], dict[str, Callable[[], object]]], reference: str
) -> str:
    """`kernel_choice.choose`, without autograd or autocast around a measurement."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return choose(kernel, candidates, reference)


def _sample(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A normal sample from a generator of its own: measuring leaves the global RNG alone."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _weight_sample(out_features: int, in_features: int) -> torch.Tensor:
    """A Linear's weight for a measurement, scaled as an initialised or trained layer's
    (std 1/√in_features): the GELU then gets inputs of unit scale, as in a model. Unscaled,
    its inputs are √in_features times larger, where the GELU kernels' exp and tanh take
    slow paths (PyTorch's tanh GELU four times slower), which would misjudge the plain
    Linear + GELU against the fused kernel."""
    return _sample((out_features, in_features)) * in_features**-0.5


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

    The kernel `torch.compile` (Inductor) fuses a CPU Linear and GELU into,
    `torch.ops.mkldnn._linear_pointwise`: the GELU runs on the matmul's output while
    it is in cache, and no second buffer is written. Whether that beats the plain
    Linear and GELU depends on the CPU (its GELU post-op and its matmul against
    MKL's), so `linear_gelu` and `token_mixing` take it only where it measured faster.
    The same function to float rounding (another matmul kernel than `F.linear`'s).

    None where it does not apply (`fused_linear_gelu_applies`). `x` may be a strided
    view: (..., in) -> (..., out), contiguous.
    """
    if not fused_linear_gelu_applies(x, linear):
        return None
    return torch.ops.mkldnn._linear_pointwise(
        x, linear.weight, linear.bias, "gelu", [], approximate
    )


def fused_linear_gelu_applies(x: torch.Tensor, linear: nn.Module) -> bool:
    """Whether `fused_linear_gelu` can run: not when autograd would record the matmul
    (the op has no backward), off the CPU, for other dtypes than float32, under
    autocast (it is not autocast-aware), while `torch.compile` traces (Inductor fuses
    by itself) or `torch.export` does (the ONNX exporter traces with it, and ONNX has
    no such op: `is_compiling` is true for both), for an int8 Linear (`is_int8`), or
    in a PyTorch built without oneDNN or without the op."""
    return not (
        is_int8(linear)
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or records_graph(x, linear.weight, linear.bias)
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or not _HAS_ONEDNN_LINEAR_POINTWISE
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
    (`baddbmm`). Without autograd on a CPU, where it measured faster here, the first
    layer and its GELU are one oneDNN kernel (`fused_linear_gelu`) reading yᵀ as a
    strided view; its (b, c, t) output enters the second matmul transposed, again as
    a view. `mlp`'s dropout is not applied: Mixer's MLPs have none.
    """
    if is_int8(mlp.fc1) or is_int8(mlp.fc2):  # packed weights: the paper's formulation
        return x + rearrange(mlp(rearrange(y, "b n c -> b c n")), "b c n -> b n c")
    b = y.shape[0]
    transposed = rearrange(y, "b n c -> b c n")
    if fused_linear_gelu_applies(transposed, mlp.fc1) and _fused_token_mixing_wins(mlp, y):
        hidden = fused_linear_gelu(transposed, mlp.fc1, mlp.act.approximate)
        hidden = rearrange(hidden, "b c t -> b t c")
    else:
        hidden = _token_hidden(mlp.fc1.weight, mlp.fc1.bias, y, mlp.act)
    w2 = repeat(mlp.fc2.weight, "n t -> b n t", b=b)
    x = torch.baddbmm(x, w2, hidden)
    return x + rearrange(mlp.fc2.bias, "n -> n 1")


def _token_hidden(
    weight: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, act: nn.GELU
) -> torch.Tensor:
    """GELU(W₁ y + b₁), (b, t, c), for y (b, n, c): the weights multiplied from the left."""
    b, _, c = y.shape
    w1 = repeat(weight, "t n -> b t n", b=b)  # broadcast views, no copies
    h = torch.baddbmm(repeat(bias, "t -> b t c", b=b, c=c), w1, y)
    return gelu_in_place(h, act)


def _fused_token_mixing_wins(mlp: Mlp, y: torch.Tensor) -> bool:
    """Whether the fused oneDNN kernel on yᵀ beat `_token_hidden` for this token MLP's
    shape here (measured on 4 images)."""
    tokens_mlp_dim, num_tokens = mlp.fc1.weight.shape
    channels, approximate = y.shape[-1], mlp.act.approximate
    key = f"token_mixing_gelu_{approximate}/{num_tokens}x{tokens_mlp_dim}x{channels}/cpu/float32"
    candidates = partial(
        _token_mixing_candidates, num_tokens, tokens_mlp_dim, channels, approximate
    )
    return _measured(key, candidates, "plain") == "fused"


def _token_mixing_candidates(
    num_tokens: int, tokens_mlp_dim: int, channels: int, approximate: GeluApproximate
) -> dict[str, Callable[[], object]]:
    y = _sample((4, num_tokens, channels))
    weight, bias = _weight_sample(tokens_mlp_dim, num_tokens), _sample((tokens_mlp_dim,))
    act = nn.GELU(approximate=approximate)
    return {
        "plain": lambda: _token_hidden(weight, bias, y, act),
        "fused": lambda: torch.ops.mkldnn._linear_pointwise(
            rearrange(y, "b n c -> b c n"), weight, bias, "gelu", [], approximate
        ),
    }


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
