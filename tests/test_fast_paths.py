"""The speed paths of `vitlab.models.fast` compute what the plain formulation computes.

Each fast path (`make bench` measures what it buys) is checked against the
straightforward computation it replaces, forward and backward:

- a class-token ViT runs its last block for the class token only
  (`fast.class_token_block`), against `forward_head(forward_features(x))`, with
  token merging too (its proportional attention reaches that block);
- Mixer's token mixing multiplies from the left with the residual folded in
  (`fast.token_mixing`), against the paper's transposed `MixerBlock.mix_tokens`;
- a StdConv2d pads symmetric SAME padding inside the conv (`fast.conv2d_padded`),
  against `pad_same`; the ResNet's ReLUs work in place (`fast.relu_in_place`);
- without autograd, the MLPs' GELU overwrites its input (`fast.gelu_in_place`), or
  runs inside the first layer's matmul on a CPU (`fast.fused_linear_gelu`), against
  the same model with autograd on;
- the attention's fused `qkv` projection, split into q, k, v on its feature axis
  (`Attention.split_heads`), against three projections and the softmax
  written out;
- the tanh GELU as x·σ(2u) (`fast.tanh_gelu`, `fast.tanh_gelu_backward`), against
  PyTorch's GELU and its autograd;
- a Dense by oneDNN's matmul (`fast.onednn_linear`), against `F.linear`, forward and
  backward, and whole models trained with it against the same models without it.

The paths whose winner depends on the CPU are taken where `kernel_choice` measured
them faster; the tests here force each choice both ways (`choices`), so every
path is checked on every machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tests.conftest import tiny_vit
from tests.test_scale_knobs import images, randomized, tiny_hybrid, tiny_mixer
from vitlab.models import ResNetV2, fast
from vitlab.models.fast import fused_linear_gelu
from vitlab.models.layers import Attention, Mlp
from vitlab.models.resnet import WEIGHT_STANDARDIZATION_EPS, StdConv2d, pad_same


def full_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every block over every token, then pooling: the computation `forward` shortens."""
    return model.forward_head(model.forward_features(x))


def outputs_and_grads(model: nn.Module, run, x: torch.Tensor):
    model.zero_grad()
    out = run(x)
    out.square().mean().backward()
    # A parameter the output does not reach has no grad in one path, zeros in the other.
    return out.detach(), {
        name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for name, p in model.named_parameters()
    }


CLASS_TOKEN_MODELS = {
    "learned": lambda: tiny_vit(),
    "sincos2d": lambda: tiny_vit(pos_embed="sincos2d"),
    "none": lambda: tiny_vit(pos_embed="none"),
    "conditional": lambda: tiny_vit(pos_embed="conditional"),
    "conditional_one_block": lambda: tiny_vit(pos_embed="conditional", num_layers=1),
    "rope2d": lambda: tiny_vit(pos_embed="rope2d"),
    "hybrid": tiny_hybrid,
    "checkpointed": lambda: tiny_vit(grad_checkpointing=True),
    "token_merging": lambda: tiny_vit(token_merging=3),  # proportional attention in the last block
}


@pytest.mark.parametrize("make", CLASS_TOKEN_MODELS.values(), ids=CLASS_TOKEN_MODELS.keys())
def test_class_token_forward_matches_the_full_encoder(make) -> None:
    model = randomized(make()).train()
    assert model.classifier == "token"
    x = images(model, batch=3)
    logits, grads = outputs_and_grads(model, model, x)
    full_logits, full_grads = outputs_and_grads(model, lambda x: full_forward(model, x), x)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_class_token_forward_skips_the_last_blocks_patch_tokens(monkeypatch) -> None:
    """The shortcut is taken: the last MLP sees one token per image, the others all of them."""
    model = randomized(tiny_vit(num_layers=3)).eval()
    widths = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda _, args, out: widths.append(args[0].shape[1]))
    with torch.no_grad():
        model(images(model, batch=2))
    tokens = 1 + model.grid[0] * model.grid[1]
    assert widths == [tokens, tokens, 1]


def test_attention_and_its_gradients_are_the_written_out_formula() -> None:
    """The fused qkv's split (and the concatenation of its gradients in backward) keeps
    q, k and v in the (three heads head_dim) order that the checkpoints' layout writes."""
    attention = randomized(Attention(hidden_size=16, num_heads=2))
    x = torch.randn(3, 5, 16)

    def written_out(x: torch.Tensor) -> torch.Tensor:
        weights, biases = attention.qkv.weight.chunk(3), attention.qkv.bias.chunk(3)
        q, k, v = (
            rearrange(F.linear(x, w, b), "b n (h d) -> b h n d", h=2)
            for w, b in zip(weights, biases, strict=True)
        )
        scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) / q.shape[-1] ** 0.5
        attended = torch.einsum("b h i j, b h j d -> b h i d", scores.softmax(-1), v)
        return attention.out(rearrange(attended, "b h n d -> b n (h d)"))

    out, grads = outputs_and_grads(attention, attention, x)
    expected_out, expected_grads = outputs_and_grads(attention, written_out, x)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gap_classifier_still_runs_every_token() -> None:
    model = randomized(tiny_vit(classifier="gap")).train()
    x = images(model)
    logits, _ = outputs_and_grads(model, model, x)
    torch.testing.assert_close(logits, full_forward(model, x).detach())


def test_mixer_token_mixing_matches_the_transposed_mlp() -> None:
    model = randomized(tiny_mixer()).train()
    block = model.blocks[0]
    torch.manual_seed(3)
    x = torch.randn(3, model.grid[0] * model.grid[1], model.hidden_dim)

    def transposed(x: torch.Tensor) -> torch.Tensor:
        y = rearrange(block.norm1(x), "b n c -> b c n")
        return x + rearrange(block.token_mixing(y), "b c n -> b n c")

    def folded(x: torch.Tensor) -> torch.Tensor:
        return fast.token_mixing(block.token_mixing, block.norm1(x), x)

    fast_out, fast_grads = outputs_and_grads(block, folded, x)
    plain, plain_grads = outputs_and_grads(block, transposed, x)
    torch.testing.assert_close(fast_out, plain, rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_mixer_block_is_the_papers_token_then_channel_mixing() -> None:
    """The block, fast path included, is x + mix_tokens(LN(x)), then x + ChannelMLP(LN(x))."""
    model = randomized(tiny_mixer()).train()
    block = model.blocks[0]
    torch.manual_seed(3)
    x = torch.randn(3, model.grid[0] * model.grid[1], model.hidden_dim)
    y = x + block.mix_tokens(block.norm1(x))
    expected = y + block.channel_mixing(block.norm2(y))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kernel_size", "stride", "size"),
    [(3, 1, 8), (3, 1, 7), (3, 2, 8), (3, 2, 7), (1, 2, 8), (7, 2, 16), (7, 2, 15)],
)
def test_std_conv_same_padding_matches_explicit_padding(kernel_size, stride, size) -> None:
    torch.manual_seed(0)
    conv = StdConv2d(4, 6, kernel_size, stride)
    x = torch.randn(2, 4, size, size)
    std, mean = torch.std_mean(conv.weight, dim=(1, 2, 3), correction=0, keepdim=True)
    weight = (conv.weight - mean) / (std + WEIGHT_STANDARDIZATION_EPS)
    expected = F.conv2d(pad_same(x, kernel_size, stride), weight, stride=stride)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_resnet_in_place_relus_give_the_out_of_place_gradients(monkeypatch) -> None:
    """The ReLUs after GroupNorm and after the residual sum work in place (GroupNorm and
    addition keep nothing of their outputs for backward): same gradients as out of place."""
    stem = randomized(ResNetV2((1, 1), width_factor=0.5))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        stem.zero_grad()
        x.grad = None
        stem(x).square().mean().backward()
        return x.grad.clone(), [p.grad.clone() for p in stem.parameters()]

    in_place = run()
    relu = F.relu
    monkeypatch.setattr(F, "relu", lambda t, inplace=False: relu(t))
    out_of_place = run()
    torch.testing.assert_close(in_place, out_of_place)


@pytest.fixture
def choices(monkeypatch):
    """Force the measured choices: `choices(fused=..., sigmoid_forward=..., sigmoid_backward=...,
    saved_derivative=..., onednn=...)`."""

    def force(
        fused: bool = False,
        sigmoid_forward: bool = False,
        sigmoid_backward: bool = False,
        saved_derivative: bool = False,
        onednn: bool = False,
    ):
        monkeypatch.setattr(fast, "_fused_wins", lambda *_: fused)
        monkeypatch.setattr(fast, "_onednn_linear_wins", lambda *_: onednn)
        monkeypatch.setattr(fast, "_saved_derivative_wins", lambda: saved_derivative)
        monkeypatch.setattr(fast, "_fused_token_mixing_wins", lambda *_: fused)
        wins = {"forward": sigmoid_forward, "backward": sigmoid_backward}
        monkeypatch.setattr(fast, "_tanh_gelu_wins", wins.__getitem__)

    return force


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_overwrites_its_input_only_where_autograd_keeps_nothing(approximate, choices) -> None:
    choices(sigmoid_forward=False)
    mlp = Mlp(8, 16, gelu_approximate=approximate)
    h = torch.randn(4, 16)
    expected = F.gelu(h, approximate=approximate)
    with torch.no_grad():
        given = h.clone()
        out = fast.gelu_in_place(given, mlp.act)
    assert out.data_ptr() == given.data_ptr(), "no second buffer without autograd"
    assert torch.equal(out, expected), "the same kernel: the same bits"
    with torch.inference_mode():
        given = h.clone()
        assert fast.gelu_in_place(given, mlp.act).data_ptr() == given.data_ptr()
    # With autograd, backward needs the GELU's input: it must be left as it was.
    given = h.clone().requires_grad_()
    out = fast.gelu_in_place(given, mlp.act)
    assert out.data_ptr() != given.data_ptr()
    assert torch.equal(given.detach(), h)
    out.sum().backward()
    assert given.grad is not None


def test_gelu_in_place_by_sigmoid_overwrites_its_input(choices) -> None:
    choices(sigmoid_forward=True)
    h = torch.randn(4, 16)
    with torch.no_grad():
        given = h.clone()
        out = fast.gelu_in_place(given, nn.GELU(approximate="tanh"))
    assert out.data_ptr() == given.data_ptr()
    torch.testing.assert_close(out, F.gelu(h, approximate="tanh"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [7, fast.GELU_CHUNK], ids=["chunked", "one_chunk"])
def test_tanh_gelu_by_sigmoid_is_pytorchs_tanh_gelu(chunk, monkeypatch) -> None:
    monkeypatch.setattr(fast, "GELU_CHUNK", chunk)
    x = torch.linspace(-12, 12, 3 * 101, dtype=torch.float64).reshape(3, 101)
    torch.testing.assert_close(
        fast.tanh_gelu(x), F.gelu(x, approximate="tanh"), rtol=1e-13, atol=1e-13
    )
    x32 = torch.randn(5, 33) * 4
    expected = F.gelu(x32, approximate="tanh")
    torch.testing.assert_close(fast.tanh_gelu(x32), expected, rtol=1e-6, atol=1e-6)
    assert fast.tanh_gelu(x32, out=x32).data_ptr() == x32.data_ptr()
    torch.testing.assert_close(x32, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [7, fast.GELU_CHUNK], ids=["chunked", "one_chunk"])
def test_tanh_gelu_backward_is_the_gradient_of_pytorchs_tanh_gelu(chunk, monkeypatch) -> None:
    monkeypatch.setattr(fast, "GELU_CHUNK", chunk)
    x = torch.linspace(-12, 12, 3 * 101, dtype=torch.float64).reshape(3, 101).requires_grad_()
    grad = torch.randn(3, 101, dtype=torch.float64)
    F.gelu(x, approximate="tanh").backward(grad)
    given = fast.tanh_gelu_backward(grad, x.detach())
    torch.testing.assert_close(given, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("forward", "backward"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_gelu_with_autograd_takes_each_direction_as_chosen(forward, backward, choices) -> None:
    choices(sigmoid_forward=forward, sigmoid_backward=backward)
    x = (torch.randn(6, 40) * 3).requires_grad_()
    grad = torch.randn(6, 40)
    out = fast.gelu(x, nn.GELU(approximate="tanh"))
    out.backward(grad)
    expected_x = x.detach().clone().requires_grad_()
    expected = F.gelu(expected_x, approximate="tanh")
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)
    assert torch.autograd.gradcheck(
        lambda t: fast.gelu(t, nn.GELU(approximate="tanh")),
        torch.randn(3, 5, dtype=torch.float64, requires_grad=True),
    ) or not (forward or backward), "float64 takes PyTorch's GELU (the paths are float32)"


@pytest.mark.parametrize("chunk", [7, fast.GELU_CHUNK], ids=["chunked", "one_chunk"])
def test_tanh_gelu_and_derivative_are_pytorchs_gelu_and_its_gradient(chunk, monkeypatch) -> None:
    monkeypatch.setattr(fast, "GELU_CHUNK", chunk)
    x = torch.linspace(-12, 12, 3 * 101, dtype=torch.float64).reshape(3, 101).requires_grad_()
    expected = F.gelu(x, approximate="tanh")
    expected.backward(torch.ones_like(x))
    out, derivative = fast.tanh_gelu_and_derivative(x.detach())
    torch.testing.assert_close(out, expected.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(derivative, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigmoid_forward", [True, False])
def test_training_keeps_the_gelus_derivative_where_that_measured_faster(
    sigmoid_forward, choices
) -> None:
    x = (torch.randn(6, 40) * 3).requires_grad_()
    grad = torch.randn(6, 40)
    expected_x = x.detach().clone().requires_grad_()
    expected = F.gelu(expected_x, approximate="tanh")
    expected.backward(grad)
    for saved in (True, False):
        choices(sigmoid_forward=sigmoid_forward, saved_derivative=saved)
        out = fast.gelu(x, nn.GELU(approximate="tanh"))
        kept = type(out.grad_fn).__name__.startswith("_TanhGeluSavingDerivative")
        assert kept == saved
        out.backward(grad)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)
        x.grad = None
    choices(saved_derivative=True)
    with torch.no_grad():  # nothing to keep a derivative for: the GELU runs in place
        h = torch.randn(6, 40)
        assert fast.gelu_in_place(h, nn.GELU(approximate="tanh")).data_ptr() == h.data_ptr()


def test_inductors_loop_is_pytorchs_tanh_gelu_and_its_gradient() -> None:
    """One compile serves every length (a flat view, dynamic), the vector loop's tail too."""
    for shape in ((6, 40), (3, 101), (2, 5, 333)):
        x = (torch.randn(shape) * 4).requires_grad_()
        grad = torch.randn(shape)
        out = fast.tanh_gelu_loop(x)
        out.backward(grad)
        expected_x = x.detach().clone().requires_grad_()
        expected = F.gelu(expected_x, approximate="tanh")
        expected.backward(grad)
        assert out.shape == shape
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-5, atol=1e-5)


def test_the_compiled_formula_keeps_its_constants_out_of_the_graphs_inputs() -> None:
    """With dynamic shapes Dynamo lifts a module's float into a graph input, and Inductor
    builds a loop that reads one for a single thread: the formula's are literals."""
    inputs = []

    def recording_backend(gm, example_inputs):
        inputs.append([node.name for node in gm.graph.nodes if node.op == "placeholder"])
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fast.tanh_gelu_formula, dynamic=True, backend=recording_backend)(torch.randn(100))
    torch._dynamo.reset()
    ((_length, x),) = inputs
    assert x == "l_x_", "the input alone, beside its symbolic length"
    x = torch.linspace(-12, 12, 3 * 101, dtype=torch.float64)
    torch.testing.assert_close(  # the written-out constants are C1 and C2
        fast.tanh_gelu_formula(x), F.gelu(x, approximate="tanh"), rtol=1e-13, atol=1e-13
    )


def test_inductors_loop_in_place_writes_pytorchs_tanh_gelu_over_its_input() -> None:
    for no_graph in (torch.no_grad, torch.inference_mode):
        with no_graph():
            for shape in ((6, 40), (3, 101)):
                h = torch.randn(shape) * 4
                expected = F.gelu(h, approximate="tanh")
                out = fast.tanh_gelu_loop_(h)
                assert out.data_ptr() == h.data_ptr() and out.shape == shape
                torch.testing.assert_close(h, expected, rtol=1e-6, atol=1e-6)


@pytest.fixture
def loop_calls(monkeypatch):
    """The calls of `fast.tanh_gelu_loop` and `fast.tanh_gelu_loop_` (run for real), by
    name and shape, with a minimum size of 64 elements."""
    calls = []
    for name in ("tanh_gelu_loop", "tanh_gelu_loop_"):
        real = getattr(fast, name)
        monkeypatch.setattr(
            fast, name, lambda x, name=name, real=real: calls.append((name, x.shape)) or real(x)
        )
    monkeypatch.setattr(fast, "GELU_LOOP_MIN", 64)
    monkeypatch.setattr(fast, "_gelu_loop_failed", False)
    return calls


@pytest.mark.parametrize("loop_won", [True, False], ids=["loop_won", "eager_won"])
def test_training_takes_inductors_loop_only_where_it_measured_faster(
    loop_won, loop_calls, choices, monkeypatch
) -> None:
    choices(sigmoid_forward=True)
    asked = []
    monkeypatch.setattr(
        fast, "_gelu_loop_wins", lambda in_place: asked.append(in_place) or loop_won
    )
    act = nn.GELU(approximate="tanh")
    x = (torch.randn(4, 40) * 3).requires_grad_()
    expected = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(fast.gelu(x, act), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # nothing recorded: the GELU written over its input
        h = x.detach().clone()
        assert fast.gelu_in_place(h, act).data_ptr() == h.data_ptr()
        torch.testing.assert_close(h, expected, rtol=1e-6, atol=1e-6)
    assert asked == [False, True], "the training and the in-place measurements"
    expected_calls = [("tanh_gelu_loop", (4, 40)), ("tanh_gelu_loop_", (4, 40))]
    assert loop_calls == (expected_calls if loop_won else [])
    loop_calls.clear()
    fast.gelu(x[:1], act)  # 40 elements, below the minimum
    with torch._dynamo.config.patch(disable=True):  # TORCH_COMPILE_DISABLE=1
        fast.gelu(x, act)
    monkeypatch.setattr(fast, "cpu_compiler", lambda: None)  # nothing to build it with
    fast.gelu(x, act)
    with torch.no_grad():
        fast.gelu_in_place(x.detach().clone(), act)
    assert loop_calls == []


def test_a_loop_that_fails_to_build_leaves_the_eager_kernels_with_a_warning(
    loop_calls, tmp_path, monkeypatch, caplog
) -> None:
    from vitlab.models import kernel_choice

    monkeypatch.setenv("VITLAB_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    kernel_choice.forget()

    def broken(x):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(fast, "tanh_gelu_loop", broken)
    x = (torch.randn(4, 40) * 3).requires_grad_()
    try:
        with caplog.at_level("WARNING", logger="vitlab.models.fast"):
            out = fast.gelu(x, nn.GELU(approximate="tanh"))
        assert "no compiler today" in caplog.text
        torch.testing.assert_close(out, F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)
        assert fast._gelu_loop_failed
        assert kernel_choice.chosen(fast.GELU_LOOP) is None, "nothing cached for later runs"
        fast.gelu(x, nn.GELU(approximate="tanh"))
        assert caplog.text.count("no compiler today") == 1, "one warning, no second try"
    finally:
        kernel_choice.forget()


def test_the_sigmoid_form_is_an_eager_cpu_float32_path() -> None:
    x = torch.randn(4, 8)
    assert fast._tanh_gelu_applies(x)
    assert not fast._tanh_gelu_applies(x.double())
    assert not fast._tanh_gelu_applies(x.bfloat16())
    assert not fast._tanh_gelu_applies(x.mT), "strided: PyTorch's kernel"
    traced = []
    with pytest.warns(FutureWarning):  # jit.trace is deprecated, and still used by exporters
        torch.jit.trace(
            lambda t: traced.append(fast._tanh_gelu_applies(t)) or t, x, check_trace=False
        )
    assert traced and not any(traced)


def test_linear_gelu_takes_the_fused_kernel_only_where_it_measured_faster(
    choices, monkeypatch
) -> None:
    linear, x = nn.Linear(24, 40), torch.randn(2, 7, 24)
    expected = F.gelu(linear(x), approximate="tanh").detach()
    calls = []
    real = fast.fused_linear_gelu
    monkeypatch.setattr(fast, "fused_linear_gelu", lambda *a: calls.append(1) or real(*a))
    for fused in (True, False):
        choices(fused=fused)
        calls.clear()
        with torch.no_grad():
            out = fast.linear_gelu(x, linear, nn.GELU(approximate="tanh"))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert calls == ([1] if fused else [])


def test_the_measured_kernels_run_their_candidates(tmp_path, monkeypatch) -> None:
    """The real measurements, on this machine: each picks one of its candidates and caches it."""
    from vitlab.models import kernel_choice

    monkeypatch.setenv("VITLAB_KERNEL_CACHE", str(tmp_path / "kernels.json"))
    kernel_choice.forget()
    try:
        for direction in ("forward", "backward"):
            assert fast._tanh_gelu_wins(direction) in (True, False)
        assert fast._saved_derivative_wins() in (True, False)
        assert fast._fused_wins(nn.Linear(8, 16), "tanh") in (True, False)
        mixer_mlp = Mlp(9, 12)
        assert fast._fused_token_mixing_wins(mixer_mlp, torch.randn(2, 9, 5)) in (True, False)
        assert fast.choose_compiled_gelu() in (True, False), "two small compiles, timed"
        for in_place in (False, True):
            assert fast._gelu_loop_wins(in_place) in (True, False), "a small compile, timed"
        for training in (True, False):
            assert fast._onednn_linear_wins(nn.Linear(8, 16), training) in (True, False)
        import json

        cached = json.loads((tmp_path / "kernels.json").read_text())
        assert set(cached[kernel_choice.machine_key()]) == {
            "tanh_gelu_forward/cpu/float32",
            "tanh_gelu_backward/cpu/float32",
            "tanh_gelu_saved_derivative/cpu/float32",
            "linear_gelu_tanh/8x16/cpu/float32",
            "token_mixing_gelu_tanh/9x12x5/cpu/float32",
            "tanh_gelu_compiled/cpu/float32",
            "tanh_gelu_inductor_loop/cpu/float32",
            "tanh_gelu_inductor_loop_in_place/cpu/float32",
            "linear_onednn_train/8x16/cpu/float32",
            "linear_onednn_infer/8x16/cpu/float32",
        }
    finally:
        kernel_choice.forget()


def test_the_fused_kernels_are_measured_on_a_layers_scale(monkeypatch) -> None:
    """The GELU kernels slow down on large inputs: the GELU's inputs in the plain candidates
    must be of unit scale, as a model's, not √in_features (here 384 and 196) times larger."""
    scales = []
    monkeypatch.setattr(fast, "gelu_in_place", lambda h, act: scales.append(h.std().item()))
    with torch.no_grad():
        fast._linear_gelu_candidates(384, 1536, True, "tanh")["plain"]()
        fast._token_mixing_candidates(196, 384, 768, "tanh")["plain"]()
    assert len(scales) == 2 and all(0.5 < scale < 2 for scale in scales), scales


def test_fused_linear_gelu_is_the_plain_linear_then_gelu() -> None:
    linear = nn.Linear(24, 40)
    x = torch.randn(2, 7, 24)
    for approximate in ("tanh", "none"):
        plain = F.gelu(linear(x), approximate=approximate).detach()
        with torch.no_grad():
            fused = fused_linear_gelu(x, linear, approximate)
            # Mixer reads its tokens transposed: a strided view, not a copy
            transposed = fused_linear_gelu(x.mT.contiguous().mT, linear, approximate)
        assert fused is not None and fused.shape == (2, 7, 40)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(transposed, plain, rtol=1e-5, atol=1e-6)


def test_fused_linear_gelu_steps_aside_where_it_does_not_apply() -> None:
    linear, x = nn.Linear(8, 16), torch.randn(3, 8)
    assert fused_linear_gelu(x, linear, "tanh") is None, "autograd records it: no backward"
    with torch.no_grad():
        assert fused_linear_gelu(x.double(), linear.double(), "tanh") is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused_linear_gelu(x, linear, "tanh") is None
    frozen = nn.Linear(8, 16).requires_grad_(False)
    assert fused_linear_gelu(x, frozen, "tanh") is not None, "nothing to record"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize(
    "make", [tiny_vit, tiny_mixer, tiny_hybrid], ids=["vit", "mixer", "hybrid"]
)
def test_inference_without_autograd_gives_the_logits_of_a_graphed_forward(
    make, fused, choices, monkeypatch
) -> None:
    choices(fused=fused, sigmoid_forward=not fused, sigmoid_backward=not fused, onednn=fused)
    model = randomized(make()).eval()
    x = images(model, batch=3)
    graphed = model(x)
    assert graphed.requires_grad
    calls = []
    real = fast.fused_linear_gelu

    def counted(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fast, "fused_linear_gelu", counted)
    for no_graph in (torch.inference_mode, torch.no_grad):
        with no_graph():
            torch.testing.assert_close(model(x), graphed.detach(), rtol=1e-5, atol=1e-6)
    if fused:
        assert calls and all(calls), "every MLP took the fused kernel"
    else:
        assert not calls, "where it measured slower, no MLP takes the fused kernel"


@pytest.mark.parametrize(
    ("compiled", "eager", "formula"),
    [
        ("sigmoid", False, True),
        ("torch", True, False),
        (None, True, True),
        (None, False, False),
    ],
)
def test_the_compiled_form_follows_the_compiled_measurement_else_the_eager_one(
    compiled, eager, formula, choices, monkeypatch
) -> None:
    """The graph's GELU follows the timing of the compiled loops made before the compile;
    where none was made (a model compiled by other code), the eager forward's."""
    choices(sigmoid_forward=eager)
    asked = []
    monkeypatch.setattr(fast, "chosen", lambda kernel: asked.append(kernel) or compiled)
    assert fast._compiled_tanh_gelu_wins() is formula
    assert asked == [fast.COMPILED_GELU]


def test_vitlabs_compiles_time_the_compiled_gelu_first(make_cfg, monkeypatch) -> None:
    """`compile=true` measures the compiled loops before the model's graph is traced."""
    from vitlab.runs.build import build_classifier

    events = []
    monkeypatch.setattr(
        fast,
        "choose_compiled_gelu",
        lambda options=None, on_cpu=True: events.append(("measured", options, on_cpu)),
    )
    real_compile = nn.Module.compile
    monkeypatch.setattr(
        nn.Module, "compile", lambda self, **kw: events.append("compiled") or real_compile(self)
    )
    build_classifier(make_cfg("compile=true", "model=vit_tiny"), with_optimizer=False)
    assert events == [("measured", {}, True), "compiled"]  # this machine has no GPU


@pytest.mark.parametrize(
    ("options", "on_cpu", "compiler"),
    [
        ({"backend": "aot_eager"}, True, "g++"),
        ({}, True, None),
        ({"mode": "max-autotune"}, True, None),
        ({}, False, "g++"),
    ],
)
def test_the_compiled_gelu_is_not_timed_where_inductor_will_not_build_it_for_a_cpu(
    options, on_cpu, compiler, monkeypatch
) -> None:
    """Another backend, no C++ compiler for Inductor, or a model on a GPU: nothing to
    compile and time, and a CPU graph would follow the eager rule, which the call answers."""
    monkeypatch.setattr(fast, "cpu_compiler", lambda: compiler)
    monkeypatch.setattr(fast, "choose", lambda *args: pytest.fail("measured"))
    monkeypatch.setattr(fast, "_compiled_tanh_gelu_wins", lambda: "the eager rule")
    assert fast.choose_compiled_gelu(options, on_cpu) == "the eager rule"


@pytest.mark.parametrize("wins", [True, False], ids=["sigmoid_won", "torch_won"])
def test_a_compiled_graph_takes_the_sigmoid_form_where_it_won(wins, monkeypatch) -> None:
    """While `torch.compile` traces, the tanh GELU is x·σ(2u) in plain ops where the
    sigmoid form won here, for Inductor to fuse; `torch.export` keeps PyTorch's GELU."""
    monkeypatch.setattr(fast, "_compiled_tanh_gelu_wins", lambda: wins)
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    mlp = randomized(Mlp(8, 16))
    x = torch.randn(3, 8)
    compiled = torch.compile(mlp, backend=recording_backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))
    (targets,) = graphs
    assert any("sigmoid" in t for t in targets) == wins
    assert any("gelu" in t for t in targets) == (not wins)
    exported = torch.export.export(mlp, (x,))
    assert any("gelu" in str(node.target) for node in exported.graph.nodes)
    torch._dynamo.reset()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", [(2, 7, 24), (5, 24)], ids=["tokens", "rows"])
def test_onednn_linear_and_its_gradients_are_f_linears(shape, bias) -> None:
    layer, x = nn.Linear(24, 40, bias=bias), torch.randn(*shape, requires_grad=True)

    def run(forward):
        layer.zero_grad()
        x.grad = None
        out = forward(x)
        out.square().mean().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]

    onednn = run(lambda t: fast.onednn_linear(t, layer))
    torch.testing.assert_close(onednn, run(layer), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fast.onednn_linear(x, layer), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_linear_takes_onednn_only_where_it_measured_faster(training, monkeypatch) -> None:
    layer, x = nn.Linear(24, 40), torch.randn(2, 7, 24, requires_grad=training)
    expected = layer(x).detach()
    calls, asked = [], []
    real = fast._onednn_matmul
    monkeypatch.setattr(fast, "_onednn_matmul", lambda *a: calls.append(1) or real(*a))
    for onednn in (True, False):
        monkeypatch.setattr(
            fast,
            "_onednn_linear_wins",
            lambda layer, train, wins=onednn: asked.append(train) or wins,
        )
        calls.clear()
        with torch.set_grad_enabled(training):
            out = fast.linear(x, layer)
        torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)
        assert calls == ([1] if onednn else [])
    assert asked == [training, training], "training and inference are measured apart"


def test_onednn_linear_steps_aside_where_it_does_not_apply() -> None:
    layer, x = nn.Linear(8, 16), torch.randn(3, 8)
    assert fast.onednn_linear_applies(x, layer)
    assert not fast.onednn_linear_applies(x.double(), layer.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast.onednn_linear_applies(x, layer)
    int8 = torch.ao.nn.quantized.dynamic.Linear(8, 16)
    assert not fast.onednn_linear_applies(x, int8)
    assert not fast.onednn_linear_applies(x[0], layer), "a vector: F.linear's own case"
    traced = []
    torch.jit.trace(
        lambda t: traced.append(fast.onednn_linear_applies(t, layer)) or t, x, check_trace=False
    )
    assert traced and not any(traced), "the TorchScript tracer records F.linear"


@pytest.mark.parametrize(
    "make", [tiny_vit, tiny_mixer, tiny_hybrid], ids=["vit", "mixer", "hybrid"]
)
def test_a_model_trains_alike_with_onednns_linear_and_without(make, choices) -> None:
    model = randomized(make())
    x = images(model, batch=3)
    results = []
    for onednn in (True, False):
        choices(onednn=onednn)
        results.append(outputs_and_grads(model, model, x))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
