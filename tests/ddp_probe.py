"""A test-only Lightning callback: each DDP rank writes the config it trains with.

Used by tests/test_distributed.py through `+callbacks.probe._target_=tests.ddp_probe.RankConfig`;
the rank processes Lightning starts must be able to import it (PYTHONPATH=<repo>).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RankConfig(L.Callback):
    """At the start of `fit`, write `<dirpath>/rank<global rank>.json`: rank, world size, resolved config."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "config": pl_module.hparams["config"],
        }
        path = self.dirpath / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
