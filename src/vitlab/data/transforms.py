"""The original ViT's preprocessing, in torchvision transforms v2.

`vit_jax/input_pipeline.py` trains on an inception crop (a random box of 5-100% of
the area, aspect 3/4..4/3, resized to the model's resolution) with a random
horizontal flip, evaluates on a plain resize to that resolution (no centre crop),
and maps pixels to [-1, 1] as `x / 127.5 - 1`. The datasets here choose their own
crop range and flip; the rest is shared. `BatchRandomResizedCrop` is the same crop
for images already held as one NCHW tensor, done for a whole batch in one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def _to_signed_unit(num_channels: int) -> list[v2.Transform]:
    """uint8 image -> float32 in [-1, 1]: `(x / 255 - 0.5) / 0.5 == x / 127.5 - 1`."""
    half = [0.5] * num_channels
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(half, half), v2.ToPureTensor()]


def train_transform(
    image_size: int,
    num_channels: int,
    crop_scale: Sequence[float],
    crop_ratio: Sequence[float],
    hflip: bool,
    randaugment: Sequence[int] | None = None,
) -> v2.Compose:
    """PIL image -> augmented (num_channels, image_size, image_size) float32 in [-1, 1].

    `crop_scale` is the (min, max) fraction of the image area the crop covers and
    `crop_ratio` its (min, max) aspect ratio; the paper's values are (0.05, 1.0) and
    (3/4, 4/3). `randaugment` = (num_ops, magnitude) adds RandAugment (AugReg's
    "light" is (2, 10), "medium" (2, 15)) on the uint8 image after the crop and flip;
    None, the original's fine-tuning, adds none.
    """
    crop = v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio))
    flip = [v2.RandomHorizontalFlip()] if hflip else []
    rand = []
    if randaugment:
        num_ops, magnitude = randaugment
        rand = [v2.RandAugment(num_ops=num_ops, magnitude=magnitude)]
    return v2.Compose([v2.ToImage(), crop, *flip, *rand, *_to_signed_unit(num_channels)])


class MixupCutmix:
    """Mixup and/or CutMix on a whole (images, int labels) batch -> (images, soft labels).

    torchvision's `v2.MixUp` / `v2.CutMix`; with both on, each batch gets one of them
    at random (AugReg's setup). Labels come back as (b, num_classes) float32 mixtures
    that sum to 1, which `ImageClassifier` trains on. Randomness comes from the
    global torch RNG, which the training loader seeds per batch
    (`vitlab.data.samplers.seeded_collate`), so runs stay reproducible and resumable.
    Picklable, so it can run in DataLoader workers.

    Attributes:
        num_classes: length of the soft labels.
        mixup_alpha: Beta(alpha, alpha) of the Mixup weight; 0 turns Mixup off.
        cutmix_alpha: Beta(alpha, alpha) of the CutMix box area; 0 turns CutMix off.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> None:
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixes:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return self.mix(images, labels)


def eval_transform(image_size: int, num_channels: int) -> v2.Compose:
    """PIL image -> (num_channels, image_size, image_size) float32 in [-1, 1], by plain resize."""
    resize = v2.Resize((image_size, image_size))
    return v2.Compose([v2.ToImage(), resize, *_to_signed_unit(num_channels)])


class BatchRandomResizedCrop:
    """Inception crop with its own random box per image, for a whole (n, c, h, w) batch.

    torchvision's transforms draw one set of parameters per call, so a batched call
    would crop every image alike; this draws a box per image and resamples all of
    them with one `grid_sample`. Output has the input's shape. Bilinear resampling
    keeps values inside the input's range. Picklable, so it can run in DataLoader
    workers.

    Attributes:
        scale: (min, max) fraction of the image area the box covers.
        ratio: (min, max) aspect ratio (width / height) of the box.
    """

    def __init__(self, scale: Sequence[float], ratio: Sequence[float]) -> None:
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        area = torch.empty(n).uniform_(*self.scale)
        log_ratio = torch.empty(n).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_ratio)
        # Box sides as fractions of the image side; a box that would not fit is clipped to it.
        width = torch.sqrt(area * aspect).clamp(max=1.0)
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        # Box centres in grid_sample's [-1, 1] coordinates, anywhere the box stays inside.
        centre_x = (1.0 - width) * torch.empty(n).uniform_(-1.0, 1.0)
        centre_y = (1.0 - height) * torch.empty(n).uniform_(-1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
        grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
