"""VisionTransformer, faithful to `vit_jax/models_vit.py`.

The same blocks in the same order as the original: (optional ResNet stem) ->
patch embedding -> class token -> position embedding -> dropout -> encoder blocks
-> encoder LayerNorm -> pooling (`token` or `gap`) -> optional tanh pre-logits ->
zero-initialised head. Input is NCHW float in [-1, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from vitlab.models.layers import LAYER_NORM_EPS, Block, GeluApproximate, PatchEmbed, lecun_normal_
from vitlab.models.pos_embed import LearnedPositionEmbedding

Classifier = Literal["token", "gap"]


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021), or R+ViT when a `stem` is given.

    Attributes:
        image_size: side of the square input in pixels.
        patch_size: side of a patch, in pixels, or in stem feature-map cells for hybrids.
        num_classes: size of the head; 0 for no head (features only).
        hidden_size, num_layers, num_heads, mlp_dim: the paper's Table 1.
        num_channels: input image channels.
        classifier: "token" (class token) or "gap" (mean of the patch tokens).
        representation_size: width of the Dense + tanh pre-logits, or None for none.
        dropout_rate, attention_dropout_rate: 0.0 in every paper config.
        gelu_approximate: "tanh" as the original; "none" for exact GELU (timm).
        stem: an `nn.Module` mapping NCHW images to a feature map, with attributes
            `out_channels` and `stride` (e.g. `ResNetV2`); None for plain ViT.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_classes: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        num_channels: int = 3,
        classifier: Classifier = "token",
        representation_size: int | None = None,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        gelu_approximate: GeluApproximate = "tanh",
        stem: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if classifier not in ("token", "gap"):
            raise ValueError(f"classifier={classifier!r} is not one of 'token', 'gap'")
        stride = getattr(stem, "stride", 1)
        feature_size = image_size // stride
        if image_size % stride or feature_size % patch_size:
            valid = [p for p in range(1, feature_size + 1) if feature_size % p == 0]
            where = (
                f"the stem's {feature_size}x{feature_size} feature map"
                if stem
                else f"image_size={image_size}"
            )
            raise ValueError(
                f"patch_size={patch_size} does not divide {where}; valid patch sizes: {valid}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.classifier = classifier
        self.num_prefix_tokens = 1 if classifier == "token" else 0
        grid = (feature_size // patch_size, feature_size // patch_size)

        self.stem = stem
        self.patch_embed = PatchEmbed(
            patch_size, stem.out_channels if stem else num_channels, hidden_size
        )
        self.cls_token = (
            nn.Parameter(torch.zeros(1, 1, hidden_size)) if classifier == "token" else None
        )
        self.pos_embed = LearnedPositionEmbedding(self.num_prefix_tokens, grid, hidden_size)
        self.pos_drop = nn.Dropout(dropout_rate)
        self.blocks = nn.ModuleList(
            Block(
                hidden_size,
                num_heads,
                mlp_dim,
                dropout_rate,
                attention_dropout_rate,
                gelu_approximate,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        if representation_size:
            self.pre_logits = nn.Sequential(nn.Linear(hidden_size, representation_size), nn.Tanh())
            lecun_normal_(self.pre_logits[0].weight)
            nn.init.zeros_(self.pre_logits[0].bias)
        else:
            self.pre_logits = nn.Identity()
        self.head = (
            nn.Linear(representation_size or hidden_size, num_classes)
            if num_classes
            else nn.Identity()
        )
        if num_classes:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimizer should not decay (besides biases and norms)."""
        return {"cls_token", "pos_embed.pos_embedding"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, c, H, W) -> encoded tokens (b, prefix + h*w, hidden_size), after the final LayerNorm."""
        if self.stem is not None:
            x = self.stem(x)
        x, grid = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pos_drop(self.pos_embed(x, grid))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded tokens -> logits: pool (`token` or `gap`), pre-logits, head."""
        x = x[:, 0] if self.classifier == "token" else x.mean(dim=1)
        return self.head(self.pre_logits(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
