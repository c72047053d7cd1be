"""The transformer building blocks shared by ViT and the hybrids.

Each module mirrors one Flax module of google-research/vision_transformer
(`vit_jax/models_vit.py`) and keeps its numerics: LayerNorm eps 1e-6, tanh GELU,
attention scaled by 1/sqrt(head_dim). Query, key and value live in one fused
`qkv` projection because one matmul is faster than three; `checkpoints/layout.py`
splits and joins them when reading or writing the official layout. A rotary
position encoding reaches the attention as an optional `rotate` argument (see
`pos_embed.py`), so the blocks know nothing of which encoding a model uses.
The speed paths these blocks call (`fast.py`) sit beside the plain formulation
they compute.

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
from vitlab.models import fast, tome
from vitlab.models.flexi import resample_patch_embed

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


def checkpointed(block: nn.Module, *args: Any, enabled: bool, **kwargs: Any) -> torch.Tensor:
    """`block(*args, **kwargs)`, under activation checkpointing when `enabled` and it matters.

    Checkpointing keeps only the block's input for backward and recomputes the rest
    then: about one block's activations in memory instead of every block's, for one
    more forward pass. It is skipped in eval mode and under `torch.no_grad()`, where
    nothing is kept for backward anyway. Non-reentrant (`use_reentrant=False`), so
    it works with `torch.compile`, with inputs that need no grad, and replays the
    same dropout masks (the RNG state is restored for the recomputation).
    """
    if enabled and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's default kernel init: truncated normal with variance 1 / fan_in."""
    fan_in = weight[0].numel()
    # 0.8796... is the std of a unit normal truncated to [-2, 2].
    return nn.init.trunc_normal_(
        weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978, a=-2, b=2
    )


def patch_grid(image_size: int, patch_size: int, stem_stride: int | None = None) -> tuple[int, int]:
    """The (h, w) grid of patches over a square image, or over the feature map of a stem of that stride.

    Raises ValueError naming `patch_size`, what it must divide and the patch sizes
    that would, when the patches (or the stem's stride) do not tile the image.
    `vitlab.runs.validate` calls it on the config, before the model is built.
    """
    stride = stem_stride or 1
    feature_size = image_size // stride
    if image_size % stride or feature_size % patch_size:
        valid = [p for p in range(1, feature_size + 1) if feature_size % p == 0]
        where = (
            f"the stem's {feature_size}x{feature_size} feature map"
            if stem_stride
            else f"image_size={image_size}"
        )
        raise ValueError(
            f"patch_size={patch_size} does not divide {where}; valid patch sizes: {valid}"
        )
    return (feature_size // patch_size, feature_size // patch_size)


def classification_head(in_features: int, num_classes: int) -> nn.Module:
    """The original's zero-initialised `head` Dense, or Identity for `num_classes` 0 (features).

    A zero head makes every class equally likely at the start of fine-tuning.
    """
    if not num_classes:
        return nn.Identity()
    head = nn.Linear(in_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping patches and project each to `hidden_size`.

    The official `embedding` conv: kernel = stride = `patch_size`, VALID padding.
    Returns the tokens and the (h, w) grid they came from, which position
    encodings that know 2-D layout need.

    Attributes:
        patch_size: side of a square patch in pixels (or stem feature-map cells).
        in_channels: channels of the input image or stem feature map.
        hidden_size: width of each token.
        norm: a LayerNorm over each token after the projection (`model.patch_norm`);
            not in the original, so off in every paper config. Off, the module has
            no `norm` parameters and the state dict is the original's.
    """

    def __init__(
        self, patch_size: int, in_channels: int, hidden_size: int, norm: bool = False
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS) if norm else nn.Identity()
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self, x: torch.Tensor, patch_size: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images or feature maps (b, c, H, W) -> tokens (b, h*w, hidden_size) and the grid (h, w).

        `patch_size`: cut patches of another size than the kernel's (FlexiViT): the kernel
        is PI-resized to it (`flexi.resample_patch_embed`) and applied with that stride.
        """
        if patch_size is None or patch_size == self.patch_size:
            x = self.proj(x)
        else:
            weight = resample_patch_embed(self.proj.weight, patch_size)
            x = F.conv2d(x, weight, self.proj.bias, stride=patch_size)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(rearrange(x, "b d h w -> b (h w) d")), grid


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

    def forward(self, x: torch.Tensor, rotate: Rotate | None = None) -> torch.Tensor:
        """Tokens (b, n, d) -> (b, n, d); `rotate`, if given, turns q and k first (RoPE)."""
        q, k, v = self.queries_keys_values(x, rotate)
        x = self.attend(q, k, v)
        return fast.linear(rearrange(x, "b h n d -> b n (h d)"), self.out)  # = self.out(...)

    def queries_keys_values(
        self, x: torch.Tensor, rotate: Rotate | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (b, n, d) -> q, k, v (b, heads, n, head_dim), q and k rotated if `rotate`."""
        qkv = fast.linear(x, self.qkv)  # = self.qkv(x), faster where oneDNN's matmul is
        q, k, v = self.split_heads(qkv, parts=3)
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        return q, k, v

    def split_heads(self, projected: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(b, n, parts * heads * head_dim) -> `parts` views (b, heads, n, head_dim), in order.

        Split on the feature axis rather than unbound from a (parts b h n d) view: the
        same views, but backward then writes the gradients side by side in the
        projection's own layout, where unbind's stack needs a further copy to get back to it.
        """
        return tuple(
            rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)
            for t in projected.chunk(parts, dim=-1)
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """softmax(q kᵀ / sqrt(head_dim) + bias) v on (b, heads, n, head_dim), with attention dropout.

        Through SDPA, and through the pinned kernel if there is one. `bias`, broadcast
        to (b, heads, queries, keys), is SDPA's float `attn_mask` (token merging's
        proportional attention, `tome.py`); None adds nothing.
        """
        dropout_p = self.attention_dropout_rate if self.training else 0.0
        mask = None if bias is None else bias.to(q.dtype)
        if self.sdpa_backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        try:
            with sdpa_kernel(self.sdpa_backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        except RuntimeError as err:
            if "No viable backend" not in str(err):
                raise
            raise self._no_kernel_error(q, masked=mask is not None) from err

    def _no_kernel_error(self, q: torch.Tensor, masked: bool = False) -> ConfigError:
        """The pinned kernel cannot run attention on `q`'s device, dtype and head size."""
        return ConfigError(
            f"model.attention_backend={self.attention_backend!r} has no kernel for this "
            f"attention ({q.device.type}, {q.dtype}, head_dim {q.shape[-1]}"
            f"{', with the attention bias of token merging' if masked else ''}). "
            "On the CPU only 'math' and 'flash' exist; on CUDA 'flash' and 'cudnn' need "
            "float16/bfloat16 (e.g. trainer.precision=bf16-mixed), CUDA's 'flash' takes "
            "no attention bias, and torch's warnings "
            "above say which other condition failed. 'auto' picks a kernel that can run; "
            "'math' runs everywhere"
        )

    def attention_weights(self, x: torch.Tensor, rotate: Rotate | None = None) -> torch.Tensor:
        """Tokens (b, n, d) -> the weights softmax(q kᵀ / sqrt(head_dim)), (b, heads, n, n).

        The weights `forward` applies, written out (without dropout) for inspection;
        slower than SDPA and O(n²) in memory, so not used in `forward`.
        """
        q, k, _ = self.queries_keys_values(x, rotate)
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
        """Tokens (..., hidden_size) -> the same shape."""
        x = fast.linear_gelu(x, self.fc1, self.act)  # = self.act(self.fc1(x)), faster
        x = self.drop(x)
        x = fast.linear(x, self.fc2)  # = self.fc2(x), faster where oneDNN's matmul is
        return self.drop(x)


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
        self,
        x: torch.Tensor,
        rotate: Rotate | None = None,
        class_token_only: bool = False,
        merging: tome.TokenMerging | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, tome.TokenMerging]:
        """Tokens (b, n, d) -> (b, n, d); `rotate` is passed to the attention (see `Attention`).

        `class_token_only`: `forward(x, rotate)[:, :1]`, (b, 1, d), by the speed path
        `fast.class_token_block`, for the last block of a class-token ViT (it is a
        flag here so that activation checkpointing still wraps this block).
        `merging`: ToMe's block instead (`tome.merging_block`), which returns the
        fewer tokens and the merging state for the next block (a flag for the same reason).
        """
        if merging is not None:
            return tome.merging_block(self, x, rotate, merging, class_token_only)
        if class_token_only:
            return fast.class_token_block(self, x, rotate)
        x = x + self.drop_path(self.drop(self.attn(self.norm1(x), rotate)))
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
