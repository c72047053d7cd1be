"""The timm model with the same architecture as a vitlab model config: the benchmark's contender.

`timm_model(model_cfg)` reads the fields of a resolved `conf/model/*` config (ViT,
hybrid, Mixer or gMLP) and builds timm's own implementation with the same dims, patch
size, image size, classes and pooling, randomly initialised (`pretrained=False`).
Plain ViTs and Mixers are timm's `VisionTransformer` and `MlpMixer` classes, a
gMLP is timm's `MlpMixer` with its gMLP blocks (as timm's `gmlp_*` models); a
hybrid is the registered timm model with the same ResNet stem
(`vit_small_r26_s32_224` for R26, ...) with its transformer dims overridden.
timm keeps its own defaults elsewhere, notably exact (erf) GELU where the original,
and vitlab, use the tanh approximation: the model is timm as its users run it.

timm is a dev dependency, imported only when its model is built. A config with no
timm counterpart (another position encoding, pre-logits, a widened or convolutional
stem) raises ConfigError naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import nn

from vitlab.errors import ConfigError

VIT = "vitlab.models.VisionTransformer"
MIXER = "vitlab.models.MlpMixer"
GMLP = "vitlab.models.GMlp"
# ResNet stage sizes of our hybrid stems -> the timm hybrid with that stem.
TIMM_HYBRIDS = {
    (): "vit_tiny_r_s16_p8_224",
    (2, 2, 2, 2): "vit_small_r26_s32_224",
    (3, 4, 9): "vit_base_r50_s16_224",
    (3, 4, 6, 3): "vit_large_r50_s32_224",
}


def timm_model(model_cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """timm's model with the architecture of `model_cfg`, and a one-line description of it."""
    try:
        import timm
    except ImportError as err:
        raise ConfigError(
            "the timm contender needs timm (`pip install timm`; `make install` installs it "
            "with the dev extra); bench.timm=false skips it"
        ) from err
    target = model_cfg.get("_target_")
    if target == MIXER:
        return _timm_mixer(timm, model_cfg)
    if target == GMLP:
        return _timm_gmlp(timm, model_cfg)
    if target == VIT:
        return _timm_vit(timm, model_cfg)
    raise ConfigError(
        f"model._target_={target!r} has no timm counterpart here; known: {[VIT, MIXER, GMLP]}. "
        "bench.timm=false skips the timm contender"
    )


def _refuse(key: str, value: Any, valid: str) -> None:
    """A ConfigError: `model.<key>` has no counterpart in timm, so there is no fair race."""
    raise ConfigError(
        f"model.{key}={value!r} has no timm counterpart ({valid}); bench.timm=false skips timm"
    )


def _timm_vit(timm: Any, cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    if cfg.get("pos_embed", "learned") != "learned":
        _refuse("pos_embed", cfg["pos_embed"], "timm's ViT has a learned position embedding")
    if cfg.get("representation_size"):
        _refuse("representation_size", cfg["representation_size"], "timm's ViT has no pre-logits")
    token = cfg.get("classifier", "token") == "token"
    kwargs = dict(
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg.get("num_channels", 3),
        num_classes=cfg["num_classes"],
        embed_dim=cfg["hidden_size"],
        depth=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_dim"] / cfg["hidden_size"],
        class_token=token,
        global_pool="token" if token else "avg",
        fc_norm=False,  # as ours: the encoder norm, then pooling
        pos_drop_rate=cfg.get("dropout_rate", 0.0),
        proj_drop_rate=cfg.get("dropout_rate", 0.0),
        attn_drop_rate=cfg.get("attention_dropout_rate", 0.0),
    )
    stem = cfg.get("stem") or "patch"
    if stem == "patch":
        if cfg.get("patch_norm"):  # timm's PatchEmbed norm: a LayerNorm over each token
            kwargs["embed_norm_layer"] = partial(nn.LayerNorm, eps=1e-6)
        model = timm.models.vision_transformer.VisionTransformer(**kwargs)
        return model, "timm VisionTransformer"
    layers, width_factor = _resnet_of(cfg)
    if layers not in TIMM_HYBRIDS:
        _refuse("resnet_layers", list(layers), f"timm's hybrids have {list(TIMM_HYBRIDS)}")
    if width_factor != 1.0:
        _refuse("resnet_width_factor", width_factor, "timm's hybrid stems have 1.0")
    if cfg.get("patch_norm"):
        _refuse("patch_norm", True, "timm's hybrid patch embedding has no norm")
    name = TIMM_HYBRIDS[layers]
    return timm.create_model(name, pretrained=False, **kwargs), f"timm {name}"


def _resnet_of(cfg: Mapping[str, Any]) -> tuple[tuple[int, ...], float]:
    """The ResNet stem's units per stage and width factor; refuses a stem timm has no hybrid of.

    `stem: resnet` reads `resnet_layers` and `resnet_width_factor`; a `_target_` node
    (configs saved before those keys) its own `num_layers` and `width_factor`.
    """
    stem = cfg["stem"]
    if stem == "resnet":
        return tuple(cfg.get("resnet_layers", ())), cfg.get("resnet_width_factor", 1.0)
    if isinstance(stem, Mapping):
        return tuple(stem.get("num_layers", ())), stem.get("width_factor", 1.0)
    _refuse("stem", stem, "timm's ViTs have a patch embedding or a ResNet stem")


def _timm_mixer(timm: Any, cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    hidden = cfg["hidden_dim"]
    model = timm.models.mlp_mixer.MlpMixer(
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg.get("num_channels", 3),
        num_classes=cfg["num_classes"],
        num_blocks=cfg["num_blocks"],
        embed_dim=hidden,
        mlp_ratio=(cfg["tokens_mlp_dim"] / hidden, cfg["channels_mlp_dim"] / hidden),
        stem_norm=cfg.get("patch_norm", False),
    )
    return model, "timm MlpMixer"


def _timm_gmlp(timm: Any, cfg: Mapping[str, Any]) -> tuple[nn.Module, str]:
    """timm's `MlpMixer` built as its `gmlp_*_224` entry points build it, with our dims."""
    mixer = timm.models.mlp_mixer
    model = mixer.MlpMixer(
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg.get("num_channels", 3),
        num_classes=cfg["num_classes"],
        num_blocks=cfg["num_blocks"],
        embed_dim=cfg["hidden_dim"],
        mlp_ratio=cfg["ffn_dim"] / cfg["hidden_dim"],
        block_layer=mixer.SpatialGatingBlock,
        mlp_layer=mixer.GatedMlp,
        stem_norm=cfg.get("patch_norm", False),
    )
    return model, "timm MlpMixer (gMLP blocks)"
