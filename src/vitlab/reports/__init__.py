"""Compare finished runs without a server: read their folders, tabulate, plot.

`python src/compare.py <multirun folder>` and `notebooks/compare_sweep.ipynb` use
this package as `from vitlab import reports`. By job:

- `runs`: run folders -> `Run` (config, overrides, status, metrics, history);
- `wandb_log`: the offline W&B transaction log, for runs logged only to W&B;
- `table`: the best-first `Comparison` and its Rich / Markdown / CSV forms;
- `plots`: the four plots, and `write_report`, which writes table and plots to disk.
"""

from vitlab.reports.plots import (
    PLOT_FILES,
    plot_metric_vs_patch_size,
    plot_metric_vs_throughput,
    plot_throughput_vs_patch_size,
    plot_val_curves,
    run_label,
    write_report,
)
from vitlab.reports.runs import (
    NoRunsError,
    Run,
    find_run_dirs,
    flatten,
    is_run_dir,
    load_run,
    load_runs,
    newest_sweep,
    parse_overrides,
    read_metrics_csv,
)
from vitlab.reports.table import (
    Comparison,
    comparison_table,
    format_value,
    higher_is_better,
    optimized_metric,
    print_table,
    sort_runs,
    throughput_of,
    to_markdown,
    varied_keys,
    write_csv,
)
from vitlab.reports.wandb_log import WandbRun, read_wandb_run, wandb_records

__all__ = [
    "PLOT_FILES",
    "Comparison",
    "NoRunsError",
    "Run",
    "WandbRun",
    "comparison_table",
    "find_run_dirs",
    "flatten",
    "format_value",
    "higher_is_better",
    "is_run_dir",
    "load_run",
    "load_runs",
    "newest_sweep",
    "optimized_metric",
    "parse_overrides",
    "plot_metric_vs_patch_size",
    "plot_metric_vs_throughput",
    "plot_throughput_vs_patch_size",
    "plot_val_curves",
    "print_table",
    "read_metrics_csv",
    "read_wandb_run",
    "run_label",
    "sort_runs",
    "throughput_of",
    "to_markdown",
    "varied_keys",
    "wandb_records",
    "write_csv",
    "write_report",
]
