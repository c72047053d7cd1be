"""Benchmark a model: `python src/bench.py [model=vit_s16] [data.batch_size=32] [trainer.precision=32-true]`.

Composes `conf/bench.yaml` with Hydra and hands it to `vitlab.bench.race.bench`, which
races the model in Lightning's fit, in a bare PyTorch loop and against timm, or, with
`bench.task=token_merging [ckpt_path=...]`, to `vitlab.bench.token_merging`, which
measures inference (and a checkpoint's test accuracy) at several ToMe r; both write
`bench.md` and `bench.json` into the run folder. `bench.task=deploy` goes to
`vitlab.bench.deploy`: batch-1 and batch-32 latency in eager, int8, onnxruntime and
compiled runtimes, ours against timm's twin (`deploy.md`, `deploy.json`).
"""

import sys

import hydra
from omegaconf import DictConfig

from vitlab.bench.deploy import deploy_bench
from vitlab.bench.race import bench
from vitlab.bench.token_merging import bench_token_merging
from vitlab.runs.folders import register_resolvers
from vitlab.runs.tasks import run_task
from vitlab.runs.validate import refuse_renamed_overrides

# An unknown `bench.task` goes to the race, whose config check refuses it naming the choices.
TASKS = {"race": bench, "token_merging": bench_token_merging, "deploy": deploy_bench}


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> dict[str, float]:
    return run_task(TASKS.get(cfg.bench.get("task"), bench), cfg)


if __name__ == "__main__":
    register_resolvers()
    refuse_renamed_overrides(sys.argv[1:])
    main()
