"""Train a model: `python src/train.py [group=option ...] [key=value ...]`.

Composes `conf/train.yaml` with Hydra and hands it to `vitlab.runs.tasks.train`.
"""

import sys

import hydra
from omegaconf import DictConfig

from vitlab.runs.folders import register_resolvers
from vitlab.runs.tasks import run_task, train
from vitlab.runs.validate import refuse_renamed_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_task(train, cfg)


if __name__ == "__main__":
    register_resolvers()
    refuse_renamed_overrides(sys.argv[1:])
    main()
