"""`CSVLogger` that appends to the run's `metrics.csv` instead of deleting it.

Lightning's CSV writer deletes an existing `metrics.csv` when it starts, so a run
resumed into its own folder (`run_dir=... ckpt_path=last`, a requeued cluster job)
would lose every row logged before the interruption. This writer keeps them and
continues the file, with the columns it already has.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """An `ExperimentWriter` that continues an existing `metrics.csv`."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """Lightning's `CSVLogger`, appending to `<save_dir>/<name>/<version>/metrics.csv` if it exists."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
