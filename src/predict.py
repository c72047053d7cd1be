"""Classify image files: `python src/predict.py model_path=<ckpt | npz | timm file | onnx folder> inputs=<file | folder | glob>`.

Composes `conf/predict.yaml` with Hydra and hands it to `vitlab.deploy.predict.predict`,
which prints the top-k table and writes `predictions.csv` into the run folder (or `out=`).
Exit status 2: bad inputs or model, or some files unreadable (the others are predicted).
"""

import sys

import hydra
from omegaconf import DictConfig

from vitlab.deploy.predict import predict
from vitlab.runs.folders import register_resolvers
from vitlab.runs.tasks import run_task
from vitlab.runs.validate import refuse_renamed_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_task(predict, cfg)


if __name__ == "__main__":
    register_resolvers()
    refuse_renamed_overrides(sys.argv[1:])
    main()
