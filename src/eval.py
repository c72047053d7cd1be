"""Test a checkpoint: `python src/eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt`.

Composes `conf/eval.yaml` with Hydra and hands it to `vitlab.runs.tasks.evaluate`.
"""

import hydra
from omegaconf import DictConfig

from vitlab.runs.folders import register_resolvers
from vitlab.runs.tasks import evaluate, run_task


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> dict[str, float]:
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    register_resolvers()
    main()
