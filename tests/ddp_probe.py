"""A test-only Lightning callback: each DDP rank writes the config it trains with, and the
FlexiViT patch size it logged at each training step.

Used by tests/test_distributed.py through `+callbacks.probe._target_=tests.ddp_probe.RankConfig`;
the rank processes Lightning starts must be able to import it (PYTHONPATH=<repo>).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RankConfig(L.Callback):
    """At the start of `fit`, write `<dirpath>/rank<global rank>.json`: rank, world size, resolved
    config; after each training step, again with `patch_sizes`, this rank's `train/patch_size`
    of every step so far (FlexiViT runs only)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.record: dict = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "config": pl_module.hparams["config"],
        }
        self._write(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        size = trainer.callback_metrics.get("train/patch_size")
        if size is not None:
            self.record.setdefault("patch_sizes", []).append(int(size))
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        path = self.dirpath / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n")
