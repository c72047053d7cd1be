"""Backbones in plain PyTorch: no Lightning, no Hydra."""

from vitlab.models.checkpoints import from_official_npz, from_timm, load_pretrained
from vitlab.models.flexi import resample_flexi_pos_embed, resample_patch_embed
from vitlab.models.gmlp import GMlp
from vitlab.models.mixer import MlpMixer
from vitlab.models.resnet import ResNetV2
from vitlab.models.vit import VisionTransformer

__all__ = [
    "GMlp",
    "MlpMixer",
    "ResNetV2",
    "VisionTransformer",
    "from_official_npz",
    "from_timm",
    "load_pretrained",
    "resample_flexi_pos_embed",
    "resample_patch_embed",
]
