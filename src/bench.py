"""Benchmark a model: `python src/bench.py [model=vit_s16] [data.batch_size=32] [trainer.precision=32-true]`.

Composes `conf/bench.yaml` with Hydra and hands it to `vitlab.bench.race.bench`, which
races the model in Lightning's fit, in a bare PyTorch loop and against timm, and
writes `bench.md` and `bench.json` into the run folder.
"""

import sys

import hydra
from omegaconf import DictConfig

from vitlab.bench.race import bench
from vitlab.runs.folders import register_resolvers
from vitlab.runs.tasks import run_task
from vitlab.runs.validate import refuse_renamed_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> dict[str, float]:
    return run_task(bench, cfg)


if __name__ == "__main__":
    register_resolvers()
    refuse_renamed_overrides(sys.argv[1:])
    main()
