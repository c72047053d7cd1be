"""VisionTransformer, faithful to `vit_jax/models_vit.py`.

The same blocks in the same order as the original: (optional stem) ->
patch embedding -> class token -> position embedding -> dropout -> encoder blocks
-> encoder LayerNorm -> pooling (`token` or `gap`) -> optional tanh pre-logits ->
zero-initialised head. Input is NCHW float in [-1, 1].

`forward` reads in that order; `embed` and `encoder` are its first steps, and the
one encoder loop (`encoder`) also serves `forward_features` and `attention_maps`.
With the class-token classifier the last block runs for the class token alone,
the one speed path here (`fast.class_token_block`, marked where it is taken).

`stem` picks what comes before the patch embedding (`stems.py`): none (`patch`, the
original), the hybrids' ResNet, or one of two convolutional stems; `patch_norm` adds a
LayerNorm after the patch projection. `pos_embed` picks the position encoding
(`pos_embed.py`); the default `learned` is the original's. The others act through the
same three hooks, so the encoder loop has no branch per encoding.

Three scale knobs, off by default, change how the model runs but not what it
computes nor its parameters: `grad_checkpointing` (recompute each block's
activations in backward), `attention_backend` (pin the SDPA kernel) and
`channels_last` (NHWC memory for the stem and patch-embedding convs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from einops import rearrange, repeat
from torch import nn

from vitlab.bounds import Count, NonNegativeInt, Positive, Rate, Size
from vitlab.models import tome
from vitlab.models.layers import (
    LAYER_NORM_EPS,
    AttentionBackend,
    Block,
    GeluApproximate,
    PatchEmbed,
    Rotate,
    checkpointed,
    classification_head,
    lecun_normal_,
    patch_grid,
)
from vitlab.models.patch_dropout import PatchDropout, token_set_problem
from vitlab.models.pos_embed import PosEmbed, build_position_encoding
from vitlab.models.stems import PIXEL_STEMS, RESNET_LAYERS, StemKind, build_stem, encoder_depth

Classifier = Literal["token", "gap"]
# Called with each encoder block and the tokens and rotation entering it.
BlockInputHook = Callable[[Block, torch.Tensor, Rotate | None], None]


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021), or R+ViT with `stem="resnet"`, or ViT with a conv stem.

    Attributes:
        image_size: side of the square input in pixels.
        patch_size: side of a patch in pixels, or in ResNet feature-map cells for hybrids
            (`stem="resnet"` or a stem module); the `conv` stem's stride is the patch size.
        num_classes: size of the head; 0 for no head (features only).
        hidden_size, num_layers, num_heads, mlp_dim: the paper's Table 1.
        num_channels: input image channels.
        classifier: "token" (class token) or "gap" (mean of the patch tokens).
        representation_size: width of the Dense + tanh pre-logits, or None for none.
        dropout_rate, attention_dropout_rate: 0.0 in every paper config.
        gelu_approximate: "tanh" as the original; "none" for exact GELU (timm).
        stem: "patch" (none: the original ViT), "conv" (Xiao et al.'s stack of 3x3
            stride-2 convs + BatchNorm + ReLU, in place of one encoder block as the paper
            does: `num_layers - 1` blocks, see `stems.encoder_depth`), "patchify_ln"
            (ConvNeXt's 4x4/4 conv + LayerNorm) or "resnet" (the hybrids' `ResNetV2`);
            see `stems.py`. Or any `nn.Module` mapping NCHW images to a feature map, with
            attributes `out_channels` and `stride` (e.g. `ResNetV2(...)`); None is "patch".
        resnet_layers: ResNet units per stage for `stem="resnet"`, e.g. (3, 4, 9) for
            R50+ViT-B/16, () for the root alone; read for that stem only.
        resnet_width_factor: the ResNet root has `int(64 * resnet_width_factor)`
            channels; read for `stem="resnet"` only.
        patch_norm: a LayerNorm over each token after the patch projection (see
            `PatchEmbed`); off in every paper config and in the official checkpoints.
        pos_embed: "learned" (the original), "sincos2d" (fixed, big_vision), "none",
            "conditional" (CPVT's PEG after the first block) or "rope2d" (axial rotary
            in every attention layer); every one works at another resolution at eval.
            Only "learned" has an official checkpoint counterpart.
        grad_checkpointing: recompute each encoder block's activations in backward
            instead of keeping them (while training only); the stem is not checkpointed.
        attention_backend: "auto" (PyTorch picks) or the SDPA kernel to pin: "math",
            "flash", "mem_efficient", "cudnn" (see `layers.Attention`).
        channels_last: keep the stem's and the patch embedding's conv weights, and
            their inputs, in channels-last (NHWC) memory, which the GPU's tensor-core
            conv kernels prefer. Same outputs, same state dict.
        drop_path_rate: stochastic depth (AugReg's `sd`) of the last block; block i
            of L drops its residual branches with rate drop_path_rate * i / (L - 1),
            the linear rule of Huang et al. 0.0 (off) in the paper configs; no
            parameters, so the state dict is the same at any rate.
        flexi_patch_sizes: FlexiViT training (Beyer et al., 2023; `flexi.py`): each
            training step runs at a patch size drawn uniformly from this list, the
            stored kernel and position table resampled to it on the fly; the
            parameters keep `patch_size` and its grid. None (off) by default.
        token_merging: ToMe (Bolya et al., 2023; `tome.py`): tokens merged in every
            block, r; 0 is off. An attribute that may be changed between calls.
        patch_dropout: PatchDropout (Liu et al., 2023; `patch_dropout.py`): the share
            of patch tokens each training image drops; 0.0 is off, eval sees all.
    """

    def __init__(
        self,
        image_size: Size,
        patch_size: Size,
        num_classes: NonNegativeInt,
        hidden_size: Size,
        num_layers: Count,
        num_heads: Count,
        mlp_dim: Size,
        num_channels: Count = 3,
        classifier: Classifier = "token",
        representation_size: Size | None = None,
        dropout_rate: Rate = 0.0,
        attention_dropout_rate: Rate = 0.0,
        gelu_approximate: GeluApproximate = "tanh",
        stem: StemKind | nn.Module | None = "patch",
        resnet_layers: Sequence[Count] = RESNET_LAYERS,
        resnet_width_factor: Positive = 1.0,
        patch_norm: bool = False,
        pos_embed: PosEmbed = "learned",
        grad_checkpointing: bool = False,
        attention_backend: AttentionBackend = "auto",
        channels_last: bool = False,
        drop_path_rate: Rate = 0.0,
        flexi_patch_sizes: Sequence[Size] | None = None,
        token_merging: NonNegativeInt = 0,
        patch_dropout: Rate = 0.0,
    ) -> None:
        super().__init__()
        if classifier not in ("token", "gap"):
            raise ValueError(f"classifier={classifier!r} is not one of 'token', 'gap'")
        self.stem, cells = build_stem(
            stem,
            num_channels=num_channels,
            hidden_size=hidden_size,
            patch_size=patch_size,
            resnet_layers=resnet_layers,
            resnet_width_factor=resnet_width_factor,
        )
        # conv and patchify_ln are part of a patch_size-pixel patch; a ResNet's map is cut in cells.
        pixel_patches = isinstance(stem, str) and stem in PIXEL_STEMS
        stride = self.stem.stride if self.stem is not None and not pixel_patches else None
        self.grid = patch_grid(image_size, patch_size, stride)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.classifier = classifier
        self.grad_checkpointing = grad_checkpointing
        self.channels_last = channels_last
        self.num_prefix_tokens = 1 if classifier == "token" else 0
        self.flexi_patch_sizes = list(flexi_patch_sizes) if flexi_patch_sizes else None
        if problem := token_set_problem("patch_dropout", patch_dropout, pos_embed):
            raise ValueError(problem)

        self.patch_embed = PatchEmbed(
            cells,
            self.stem.out_channels if self.stem is not None else num_channels,
            hidden_size,
            norm=patch_norm,
        )
        for size in self.flexi_patch_sizes or ():  # each must make stem cells and tile the image
            try:
                self._embedding_patch_size(size)
                patch_grid(image_size, size, stride)
            except ValueError as err:
                sizes = self.flexi_patch_sizes
                raise ValueError(f"model.flexi_patch_sizes={sizes}: {err}") from err
        self.cls_token = (
            nn.Parameter(torch.zeros(1, 1, hidden_size)) if classifier == "token" else None
        )
        self.pos_embed = build_position_encoding(
            pos_embed,
            num_prefix_tokens=self.num_prefix_tokens,
            grid=self.grid,
            hidden_size=hidden_size,
            num_heads=num_heads,
        )
        self.token_merging = token_merging  # checked against the position encoding
        self.patch_dropout = PatchDropout(patch_dropout, self.num_prefix_tokens)
        self.pos_drop = nn.Dropout(dropout_rate)
        depth = encoder_depth(stem, num_layers)  # one block fewer with the conv stem
        self.blocks = nn.ModuleList(
            Block(
                hidden_size,
                num_heads,
                mlp_dim,
                dropout_rate,
                attention_dropout_rate,
                gelu_approximate,
                attention_backend,
                drop_path_rate * index / max(1, depth - 1),
            )
            for index in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.pre_logits = _pre_logits(hidden_size, representation_size)
        self.head = classification_head(representation_size or hidden_size, num_classes)
        if channels_last:
            self.patch_embed.to(memory_format=torch.channels_last)
            if self.stem is not None:
                self.stem.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Images (b, c, H, W) in [-1, 1] -> logits (b, num_classes).

        `patch_size`: run at another patch size than the model's (FlexiViT): the kernel and
        the learned position table are resampled to it on the fly (`flexi.py`); None, or
        the model's own, is the plain model.
        """
        x, grid = self.embed(x, patch_size)  # stem, patch embedding, class token, position
        # Speed path: the head reads only the class token, so the last block computes
        # only that (`fast.class_token_block`); `gap` pools every token.
        x = self.encoder(x, grid, class_token_only=self.classifier == "token")
        x = self.norm(x)
        x = x[:, 0] if self.classifier == "token" else x.mean(dim=1)
        x = self.pre_logits(x)
        return self.head(x)

    def embed(
        self, x: torch.Tensor, patch_size: int | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images (b, c, H, W) -> (tokens entering block 0 (b, prefix + h*w, d), grid (h, w)).

        `patch_size`: as `forward`'s.
        """
        cells = self._embedding_patch_size(patch_size)  # None: the model's own
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.stem is not None:
            x = self.stem(x)  # the stem's feature map (b, c', H / stride, W / stride)
        x, grid = self.patch_embed(x, cells)  # (b, h*w, d)
        if self.cls_token is not None:
            cls = repeat(self.cls_token, "1 1 d -> b 1 d", b=x.shape[0]).to(x.dtype)
            x = torch.cat([cls, x], dim=1)
        x = self.pos_embed(x, grid, flexi=cells is not None)
        x = self.patch_dropout(x)  # training only: a random share of the patch tokens
        return self.pos_drop(x), grid

    def _embedding_patch_size(self, patch_size: int | None) -> int | None:
        """The patch embedding's patch size, in cells of the map it cuts, for `patch_size`
        patches (FlexiViT); None for the model's own size.

        A stem is kept at every patch size. The hybrids' `patch_size` counts cells of the
        ResNet's map already; a pixel stem (conv, patchify_ln) makes cells of its stride in
        pixels, which must divide `patch_size`.
        """
        if patch_size is None or patch_size == self.patch_size:
            return None
        pixels = self.patch_size // self.patch_embed.patch_size  # per cell: 1 but for pixel stems
        if patch_size % pixels:
            raise ValueError(
                f"patch_size={patch_size} is not a multiple of {pixels}, the stride of this "
                f"model's {type(self.stem).__name__} stem, which stays as it is at every patch "
                f"size; valid patch sizes are multiples of {pixels}"
            )
        return patch_size // pixels

    def encoder(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        *,
        class_token_only: bool = False,
        on_block_input: BlockInputHook | None = None,
    ) -> torch.Tensor:
        """Tokens (b, n, d) entering block 0 -> the last block's output, before `norm`.

        The one encoder loop: `forward`, `forward_features` and `attention_maps` all run
        it. `class_token_only`: the last block returns the class token alone, (b, 1, d).
        `on_block_input(block, x, rotate)` sees what enters each block. With
        `token_merging` (ToMe, `tome.py`) every block merges tokens and hands their
        sizes on; the output has each token repeated by its size, so it has the plain
        shape and its mean is ToMe's size-weighted pooling (`tome.expand_by_size`).
        """
        rotate = self.pos_embed.rotation(grid, x.device)
        merging = (
            tome.TokenMerging(self.token_merging, self.cls_token is not None)
            if self.token_merging
            else None
        )
        tokens = x.shape[1]
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            if on_block_input is not None:
                on_block_input(block, x, rotate)
            only = class_token_only and index == last
            if merging is None:
                x = checkpointed(
                    block, x, rotate, class_token_only=only, enabled=self.grad_checkpointing
                )
            else:  # ToMe: the block merges tokens and hands their sizes on
                x, merging = checkpointed(
                    block,
                    x,
                    rotate,
                    class_token_only=only,
                    merging=merging,
                    enabled=self.grad_checkpointing,
                )
            if only:
                return x  # no after_block: the encodings leave the class token alone there
            x = self.pos_embed.after_block(index, x, grid)
        return x if merging is None else tome.expand_by_size(x, merging.size, tokens)

    @property
    def token_merging(self) -> int:
        """ToMe's r, as its `model.r`: tokens merged in every block (`tome.py`); 0 is off.

        May be set between calls (`model.token_merging = 8`); a negative value, or a
        position encoding that cannot merge (`tome.check_token_merging`), is refused.
        """
        return self._token_merging

    @token_merging.setter
    def token_merging(self, r: int) -> None:
        tome.check_token_merging(r, self.pos_embed.kind)
        self._token_merging = r

    def forward_features(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Images (b, c, H, W) -> every token after `norm`, (b, prefix + h*w, hidden_size).

        The original's encoder output (`Transformer`): the last block runs over every token.
        `patch_size`: as `forward`'s.
        """
        x, grid = self.embed(x, patch_size)
        return self.norm(self.encoder(x, grid))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens from `forward_features` -> logits: pool (`token` or `gap`), pre-logits, head."""
        x = x[:, 0] if self.classifier == "token" else x.mean(dim=1)
        return self.head(self.pre_logits(x))

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimizer should not decay (besides biases and norms)."""
        return {"cls_token", *(f"pos_embed.{name}" for name in self.pos_embed.no_weight_decay())}

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (b, c, H, W) -> each layer's attention weights, (b, num_heads, n, n), n = prefix + h*w.

        softmax(q kᵀ / sqrt(head_dim)) written out, with the model's rotation of q and
        k when it uses `rope2d`, row i being where token i looks. For inspection: call
        it in eval mode and under `torch.no_grad()`; `forward` never computes these.
        """
        maps: list[torch.Tensor] = []

        def record(block: Block, tokens: torch.Tensor, rotate: Rotate | None) -> None:
            maps.append(block.attn.attention_weights(block.norm1(tokens), rotate))

        x, grid = self.embed(x)
        self.encoder(x, grid, on_block_input=record)
        return maps

    def position_embeddings(self) -> torch.Tensor:
        """The vector the position encoding adds to each patch, on the model's grid: (h, w, hidden_size).

        For looking at what a `learned` table has learned (the ViT paper's Figure 7 is
        the cosine similarity of these vectors) beside the fixed `sincos2d` one. Raises
        ValueError for the encodings that add nothing to the tokens (`none`,
        `conditional`, `rope2d`).
        """
        table = self.pos_embed.table(self.grid, self.patch_embed.proj.weight.device)
        if table is None:
            raise ValueError(
                f"pos_embed={self.pos_embed.kind!r} adds no vector to the patch tokens; "
                "position_embeddings() exists for 'learned' and 'sincos2d'"
            )
        patches = table[self.num_prefix_tokens :]
        return rearrange(patches, "(h w) d -> h w d", h=self.grid[0], w=self.grid[1])


def _pre_logits(hidden_size: int, representation_size: int | None) -> nn.Module:
    """The original's Dense + tanh `pre_logits` of `representation_size`, or Identity for None."""
    if not representation_size:
        return nn.Identity()
    dense = nn.Linear(hidden_size, representation_size)
    lecun_normal_(dense.weight)
    nn.init.zeros_(dense.bias)
    return nn.Sequential(dense, nn.Tanh())
