"""What a run shows a person: the config tree at the start, the metrics table at the end."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import rich
from omegaconf import DictConfig, OmegaConf
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

FIRST_KEYS = ("data", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger")


def print_config_tree(cfg: DictConfig, order: Sequence[str] = FIRST_KEYS) -> None:
    """Print the composed config as a Rich tree, the main groups first, then the rest.

    Values are resolved, so the tree shows what the run really uses
    (e.g. the model's `image_size` as the data set's number, not `${data.image_size}`).
    """
    tree = Tree("CONFIG", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    rich.print(tree)


def print_metrics(metrics: Mapping[str, float], run_dir: str) -> None:
    """Print the final metrics as a table and say where the run's files are."""
    table = Table(title="Final metrics", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        table.add_row(name, f"{metrics[name]:.4f}")
    rich.print(table)
    rich.print(f"[bold]Run folder:[/bold] {run_dir}")
