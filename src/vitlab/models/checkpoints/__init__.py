"""Checkpoints in other layouts than ours: the official `.npz` files and timm's, read and written.

- `layout.py`: every parameter of ours tied to its official arrays (one einops
  pattern each, read both ways);
- `npz.py`: reading a file or a mapping of arrays;
- `load.py`: loading into a built model, with the original's fine-tuning rules;
- `resample.py`: a file's position table resized to the model's grid;
- `architecture.py`: the model a file holds, built from the file alone;
- `export.py`: our models written as official files;
- `timm.py`: every parameter of ours tied to its timm state-dict key, and timm's
  `.pth` / `.safetensors` files read (`load.py` loads them as it loads `.npz` files);
- `timm_architecture.py`: the model a timm state dict holds, computing as timm's does.
"""

from vitlab.models.checkpoints.architecture import from_official_npz
from vitlab.models.checkpoints.export import save_official_npz, to_official
from vitlab.models.checkpoints.load import load_pretrained
from vitlab.models.checkpoints.timm import to_timm
from vitlab.models.checkpoints.timm_architecture import from_timm

__all__ = [
    "from_official_npz",
    "from_timm",
    "load_pretrained",
    "save_official_npz",
    "to_official",
    "to_timm",
]
