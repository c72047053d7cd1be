"""The transformer building blocks shared by ViT and the hybrids.

Each module mirrors one Flax module of google-research/vision_transformer
(`vit_jax/models_vit.py`) and keeps its numerics: LayerNorm eps 1e-6, tanh GELU,
attention scaled by 1/sqrt(head_dim). Query, key and value live in one fused
`qkv` projection because one matmul is faster than three; `checkpoints.py`
splits and joins them when reading or writing the official layout. A rotary
position encoding reaches the attention as an optional `rotate` argument (see
`pos_embed.py`), so the blocks know nothing of which encoding a model uses.

Two scale knobs live here because every model shares them: `attention_backend`
pins the SDPA kernel (`sdpa_kernel`), and `checkpointed` runs a block under
activation checkpointing. Both leave the parameters and the numerics alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from vitlab.errors import ConfigError

LAYER_NORM_EPS = 1e-6
GeluApproximate = Literal["tanh", "none"]
# Queries or keys (b, heads, n, head_dim) -> the same, rotated by token position.
Rotate = Callable[[torch.Tensor], torch.Tensor]
# "auto" lets PyTorch pick per call; the others pin one SDPA kernel.
AttentionBackend = Literal["auto", "math", "flash", "mem_efficient", "cudnn"]
SDPA_BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def sdpa_backend(name: str) -> SDPBackend | None:
    """The SDPA kernel an `attention_backend` value pins, or None for "auto".

    Raises ConfigError naming `model.attention_backend`, the value and the valid
    choices, so a typo fails when the model is built rather than on the first step.
    """
    if name not in SDPA_BACKENDS:
        raise ConfigError(
            f"model.attention_backend={name!r} is not one of {list(get_args(AttentionBackend))}"
        )
    return SDPA_BACKENDS[name]


def checkpointed(block: nn.Module, *args: Any, enabled: bool) -> torch.Tensor:
    """`block(*args)`, under activation checkpointing when `enabled` and it matters.

    Checkpointing keeps only the block's input for backward and recomputes the rest
    then: about one block's activations in memory instead of every block's, for one
    more forward pass. It is skipped in eval mode and under `torch.no_grad()`, where
    nothing is kept for backward anyway. Non-reentrant (`use_reentrant=False`), so
    it works with `torch.compile`, with inputs that need no grad, and replays the
    same dropout masks (the RNG state is restored for the recomputation).
    """
    if enabled and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's default kernel init: truncated normal with variance 1 / fan_in."""
    fan_in = weight[0].numel()
    # 0.8796... is the std of a unit normal truncated to [-2, 2].
    return nn.init.trunc_normal_(
        weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978, a=-2, b=2
    )


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping patches and project each to `hidden_size`.

    The official `embedding` conv: kernel = stride = `patch_size`, VALID padding.
    Returns the tokens and the (h, w) grid they came from, which position
    encodings that know 2-D layout need.

    Attributes:
        patch_size: side of a square patch in pixels (or stem feature-map cells).
        in_channels: channels of the input image or stem feature map.
        hidden_size: width of each token.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return rearrange(x, "b d h w -> b (h w) d"), grid


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`.

    With `attention_backend="auto"` SDPA picks a fused kernel (flash, memory-efficient,
    cuDNN) when the device and dtype have one and exact math otherwise; every kernel
    computes the same softmax attention, to float rounding. It never materialises
    the weights; `attention_weights` computes them for inspection.

    Attributes:
        hidden_size: token width; must be divisible by `num_heads`.
        num_heads: number of attention heads.
        attention_dropout_rate: dropout on the attention weights (training only).
        attention_backend: "auto", or the one SDPA kernel to use: "math" (runs
            everywhere), "flash" (CUDA float16/bfloat16, and the CPU),
            "mem_efficient" or "cudnn" (CUDA only). A pinned kernel that cannot run
            these inputs raises ConfigError on the first forward.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        attention_dropout_rate: float = 0.0,
        attention_backend: AttentionBackend = "auto",
    ) -> None:
        super().__init__()
        self.attention_backend = attention_backend
        self.sdpa_backend = sdpa_backend(attention_backend)
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                f"choose num_heads from {[h for h in range(1, hidden_size + 1) if hidden_size % h == 0]}"
            )
        self.num_heads = num_heads
        self.attention_dropout_rate = attention_dropout_rate
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        for part in self.qkv.weight.chunk(3):  # xavier per q/k/v matrix, as the original
            nn.init.xavier_uniform_(part)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def _qkv(
        self, x: torch.Tensor, rotate: Rotate | None, first_token_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (b, n, d) -> q, k, v (b, heads, n, head_dim), q and k rotated if `rotate`.

        `first_token_only`: q for token 0 alone (b, heads, 1, head_dim), projected from
        that token only; k and v still from every token. The first token is a prefix
        token, which every position encoding leaves unrotated (`pos_embed.py`), so
        only k is rotated then.
        """
        if first_token_only:
            width = x.shape[-1]
            q = F.linear(x[:, :1], self.qkv.weight[:width], self.qkv.bias[:width])
            kv = F.linear(x, self.qkv.weight[width:], self.qkv.bias[width:])
            q = rearrange(q, "b one (h d) -> b h one d", h=self.num_heads)
            k, v = rearrange(kv, "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
            return q, k if rotate is None else rotate(k), v
        q, k, v = rearrange(
            self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        return q, k, v

    def forward(
        self, x: torch.Tensor, rotate: Rotate | None = None, first_token_only: bool = False
    ) -> torch.Tensor:
        """Tokens (b, n, d) -> (b, n, d); `rotate`, if given, turns q and k first (RoPE).

        `first_token_only`: the output for token 0 (the class token) alone, (b, 1, d).
        Keys and values still come from every token, the query from the first one
        (`_qkv`): about a third of the projection work and 1/n of the attention's.
        """
        q, k, v = self._qkv(x, rotate, first_token_only)
        dropout_p = self.attention_dropout_rate if self.training else 0.0
        x = self._sdpa(q, k, v, dropout_p)
        return self.out(rearrange(x, "b h n d -> b n (h d)"))

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """SDPA on (b, heads, n, head_dim), through the pinned kernel if there is one."""
        if self.sdpa_backend is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        try:
            with sdpa_kernel(self.sdpa_backend):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        except RuntimeError as err:
            if "No viable backend" not in str(err):
                raise
            raise ConfigError(
                f"model.attention_backend={self.attention_backend!r} has no kernel for this "
                f"attention ({q.device.type}, {q.dtype}, head_dim {q.shape[-1]}). "
                "On the CPU only 'math' and 'flash' exist; on CUDA 'flash' and 'cudnn' need "
                "float16/bfloat16 (e.g. trainer.precision=bf16-mixed), and torch's warnings "
                "above say which other condition failed. 'auto' picks a kernel that can run; "
                "'math' runs everywhere"
            ) from err

    def attention_weights(self, x: torch.Tensor, rotate: Rotate | None = None) -> torch.Tensor:
        """Tokens (b, n, d) -> the weights softmax(q kᵀ / sqrt(head_dim)), (b, heads, n, n).

        The weights `forward` applies, written out (without dropout) for inspection;
        slower than SDPA and O(n²) in memory, so not used in `forward`.
        """
        q, k, _ = self._qkv(x, rotate)
        scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) / math.sqrt(q.shape[-1])
        return scores.softmax(dim=-1)


class Mlp(nn.Module):
    """The transformer MLP: Dense -> GELU -> Dropout -> Dense -> Dropout (`MlpBlock`).

    Attributes:
        hidden_size: input and output width.
        mlp_dim: inner width.
        dropout_rate: dropout after each Dense.
        gelu_approximate: "tanh" as the original; "none" for exact erf GELU (as timm).
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        dropout_rate: float = 0.0,
        gelu_approximate: GeluApproximate = "tanh",
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_dim)
        self.act = nn.GELU(approximate=gelu_approximate)
        self.fc2 = nn.Linear(mlp_dim, hidden_size)
        self.drop = nn.Dropout(dropout_rate)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.hidden(x))))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(fc1(x)), the MLP's inner activations, by the fastest way that applies.

        Without autograd on a CPU this is one oneDNN kernel (`fused_linear_gelu`);
        otherwise fc1, then `activate`.
        """
        fused = fused_linear_gelu(x, self.fc1, self.act.approximate)
        return self.activate(self.fc1(x)) if fused is None else fused

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """GELU of `fc1`'s fresh output `h`; overwrites `h` when autograd will not need it.

        Where no graph is recorded (`torch.no_grad`, `torch.inference_mode`, or `h`
        needing no grad) nothing keeps `h`, so the same GELU kernel writes its result
        over it: no second (tokens, mlp_dim) buffer, the biggest one in the block
        (38 MB per block for ViT-S/16 at batch 32), to allocate and fault in. The
        numbers are the same to the bit. While training, backward needs `h`, so the
        GELU writes a new tensor, as `self.act` does.
        """
        if _records_graph(h):
            return self.act(h)
        return torch.ops.aten.gelu_(h, approximate=self.act.approximate)


def _records_graph(*inputs: torch.Tensor | None) -> bool:
    """Whether autograd records an op on `inputs`, i.e. keeps what its backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


_HAS_ONEDNN_LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def fused_linear_gelu(
    x: torch.Tensor, linear: nn.Linear, approximate: GeluApproximate
) -> torch.Tensor | None:
    """GELU(linear(x)) as one oneDNN matmul with GELU applied on its output, or None.

    PyTorch's own tanh-GELU kernel on a CPU costs about four times its erf GELU
    (about 8 vs 2 ms for ViT-S/16's (6304, 1536) activations on a 2-core Xeon),
    and the tanh form is the original's, which the published checkpoints need.
    oneDNN applies either form to the matmul's output while it is still in cache,
    nearly for free: the kernel `torch.compile` (Inductor) fuses a CPU Linear and
    GELU into, `torch.ops.mkldnn._linear_pointwise`. The same function to float
    rounding (about 1e-6; another matmul kernel than `F.linear`'s).

    None where it does not apply, and the caller takes the plain path: when
    autograd would record the matmul (the op has no backward), off the CPU, for
    other dtypes than float32, under autocast (it is not autocast-aware), while
    `torch.compile` traces (Inductor fuses by itself), or in a PyTorch built
    without oneDNN or without the op. `x` may be a strided view: (..., in) ->
    (..., out), contiguous.
    """
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or _records_graph(x, linear.weight, linear.bias)
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
        or not _HAS_ONEDNN_LINEAR_POINTWISE
    ):
        return None
    return torch.ops.mkldnn._linear_pointwise(
        x, linear.weight, linear.bias, "gelu", [], approximate
    )


class Block(nn.Module):
    """One pre-norm encoder block (`Encoder1DBlock`): x + Attn(LN(x)), then x + Mlp(LN(x)).

    Attributes:
        hidden_size, num_heads, mlp_dim: as in the paper's Table 1.
        dropout_rate: dropout after attention and inside the MLP.
        attention_dropout_rate: dropout on attention weights.
        gelu_approximate: see `Mlp`.
        attention_backend: see `Attention`.
        drop_path_rate: stochastic depth: the chance that a sample skips each residual
            branch while training (see `DropPath`); 0.0 in the paper configs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_dim: int,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        gelu_approximate: GeluApproximate = "tanh",
        attention_backend: AttentionBackend = "auto",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads, attention_dropout_rate, attention_backend)
        self.drop = nn.Dropout(dropout_rate)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(hidden_size, mlp_dim, dropout_rate, gelu_approximate)
        self.drop_path = DropPath(drop_path_rate)

    def forward(
        self, x: torch.Tensor, rotate: Rotate | None = None, first_token_only: bool = False
    ) -> torch.Tensor:
        """Tokens (b, n, d) -> (b, n, d); `rotate` is passed to the attention (see `Attention`).

        `first_token_only`: `forward(x)[:, :1]`, (b, 1, d), computing only what that
        needs. The class-token classifier reads nothing else of the last block, whose
        attention queries, output projection and MLP for the other n - 1 tokens would
        be thrown away: skipping them saves most of one block's work, forward and
        backward (about 7% of ViT-S/16), and changes no logit beyond float rounding.
        """
        attended = self.attn(self.norm1(x), rotate, first_token_only)
        x = (x[:, :1] if first_token_only else x) + self.drop_path(self.drop(attended))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016) on a residual branch, per sample.

    While training, each sample's branch output is zeroed with probability `rate`
    and the kept ones are scaled by 1 / (1 - rate), so the expectation is
    unchanged; in eval mode, and at rate 0, it is the identity. No parameters, so
    it leaves the state dict alone. Draws from the global torch RNG, as dropout does
    (Lightning seeds it and saves it in checkpoints).

    Attributes:
        rate: the chance of dropping the branch, in [0, 1).
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate={rate} must be in [0, 1)")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = torch.empty(x.shape[0], *(1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.rate) / (1.0 - self.rate)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
