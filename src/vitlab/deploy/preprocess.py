"""`Preprocess`: a model's evaluation transform, as one value that can be applied, written and read.

What a deployed model must be fed is what it was evaluated on: a plain resize of the
image to the model's resolution and pixels mapped to [-1, 1] as `x / 127.5 - 1`
(`vitlab.data.transforms.eval_transform`, the original ViT's evaluation pipeline).
`Preprocess` builds that very transform, never a copy of it, and describes it in
`preprocess.json` beside an export, so that a runtime without vitlab can feed the
model the same tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from vitlab.data.image_folder import PIL_MODES
from vitlab.data.transforms import eval_transform
from vitlab.errors import CheckpointError, ConfigError

PREPROCESS_FILE = "preprocess.json"
# Bumped when the meaning of a field of `preprocess.json` changes.
PREPROCESS_VERSION = 1


@dataclass(frozen=True)
class Preprocess:
    """PIL image of any mode and size -> the (num_channels, h, w) float32 tensor the model takes.

    The image is first converted to the model's colour mode (grey to RGB for a
    3-channel model, RGB / RGBA / palette to grey for a 1-channel one), as the
    image-folder datamodule reads its files, then `eval_transform` is applied.

    Attributes:
        image_size: (h, w) the model sees, in pixels; square, as `eval_transform` resizes.
        num_channels: 1 (grey, PIL mode "L") or 3 (PIL mode "RGB").
    """

    image_size: tuple[int, int]
    num_channels: int

    def __post_init__(self) -> None:
        height, width = self.image_size
        if height != width:
            raise ConfigError(
                f"image_size={self.image_size} is not square; the evaluation transform "
                "resizes to a square (h == w)"
            )
        if self.num_channels not in PIL_MODES:
            raise ConfigError(
                f"num_channels={self.num_channels} has no PIL colour mode; use 1 (grey) or 3 (RGB)"
            )

    @classmethod
    def from_data_config(cls, data: Mapping[str, Any]) -> Preprocess:
        """The preprocessing of a (resolved) data config: its `image_size` and `num_channels`."""
        size = int(data["image_size"])
        return cls(image_size=(size, size), num_channels=int(data["num_channels"]))

    @classmethod
    def for_model(cls, model: nn.Module) -> Preprocess:
        """The preprocessing of a model without a data config (an official or timm file):
        its `image_size`, and the input channels of its first convolution."""
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None or not hasattr(model, "image_size"):
            raise CheckpointError(
                f"{type(model).__name__} has no image_size or no input convolution, so its "
                "input size and channels are unknown"
            )
        size = int(model.image_size)
        return cls(image_size=(size, size), num_channels=conv.in_channels)

    @property
    def mode(self) -> str:
        """The PIL colour mode the model takes: "L" or "RGB"."""
        return PIL_MODES[self.num_channels]

    @cached_property
    def transform(self) -> v2.Compose:
        """`vitlab.data.transforms.eval_transform` for this size and channel count."""
        return eval_transform(self.image_size[0], self.num_channels)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return self.transform(image)

    def to_json(self) -> str:
        """The text of `preprocess.json`: everything a runtime needs to feed the model.

        The resize and the scaling are read from the transform itself, so the file
        says what is computed.
        """
        resize = _only(self.transform, v2.Resize)
        normalize = _only(self.transform, v2.Normalize)
        description = {
            "version": PREPROCESS_VERSION,
            "image_size": list(self.image_size),
            "num_channels": self.num_channels,
            "color_mode": self.mode,
            "resize": {
                "size": list(resize.size),
                "interpolation": str(resize.interpolation),
                "antialias": bool(resize.antialias),
            },
            "scaling": {
                "formula": "x / 127.5 - 1",
                "input": "uint8 pixels 0..255, divided by 255, then (x - mean) / std",
                "mean": list(normalize.mean),
                "std": list(normalize.std),
            },
            "range": [-1.0, 1.0],
            "layout": "NCHW",
            "dtype": "float32",
        }
        return json.dumps(description, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, label: str = PREPROCESS_FILE) -> Preprocess:
        """Read `preprocess.json` (`label` names it in errors).

        Refused with a `CheckpointError` if it is not such a file, is of another
        version, or describes a resize or scaling other than the one this code computes.
        """
        try:
            data = json.loads(text)
            preprocess = cls(
                image_size=tuple(int(s) for s in data["image_size"]),
                num_channels=int(data["num_channels"]),
            )
            version = data["version"]
        except (ValueError, KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(
                f"{label} is not a vitlab preprocess.json ({type(err).__name__}: {err})"
            ) from err
        if version != PREPROCESS_VERSION:
            raise CheckpointError(
                f"{label} has version {version!r}; this vitlab reads version {PREPROCESS_VERSION}"
            )
        expected = json.loads(preprocess.to_json())
        differ = sorted(key for key in expected if data.get(key) != expected[key])
        if differ:
            raise CheckpointError(
                f"{label} describes a preprocessing other than vitlab's evaluation transform "
                f"in {differ}: {[data.get(k) for k in differ]}, expected {[expected[k] for k in differ]}"
            )
        return preprocess


def _only(compose: v2.Compose, kind: type[v2.Transform]) -> Any:
    """The one transform of type `kind` in `compose`."""
    (found,) = [t for t in compose.transforms if isinstance(t, kind)]
    return found
