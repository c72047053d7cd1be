"""Export a model for deployment: `python src/export.py ckpt_path=<run .ckpt | .npz | timm file> [format=pt2] [quantize=int8]`.

Composes `conf/export.yaml` with Hydra and hands it to `vitlab.deploy.export.export`,
which writes the model file, `preprocess.json` and `labels.json` into the run folder
once the export has been checked against the PyTorch model (exit status 2 if not).
"""

import sys

import hydra
from omegaconf import DictConfig

from vitlab.deploy.export import export
from vitlab.runs.folders import register_resolvers
from vitlab.runs.tasks import run_task
from vitlab.runs.validate import refuse_renamed_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> dict:
    return run_task(export, cfg)


if __name__ == "__main__":
    register_resolvers()
    refuse_renamed_overrides(sys.argv[1:])
    main()
