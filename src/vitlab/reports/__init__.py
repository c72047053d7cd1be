"""Compare finished runs without a server: read their folders, tabulate, plot.

`python src/compare.py <multirun folder>` and `notebooks/compare_sweep.ipynb` use
this package as `from vitlab import reports`. By job:

- `runs`: run folders -> `Run` (config, overrides, status, metrics, history);
- `wandb_log`: the offline W&B transaction log, for runs logged only to W&B;
- `table`: the best-first `Comparison` and its Rich / Markdown / CSV forms;
- `aggregate`: jobs repeated over `seed` / `data.fold` as groups, and their mean ± std table;
- `plots`: the four plots, and `write_report`, which writes table and plots to disk.
"""

from vitlab.reports.aggregate import (
    REPEAT_KEYS,
    Group,
    group_runs,
    mean_table,
    repeat_keys,
    sort_groups,
)
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
    Summary,
    cell_text,
    comparison_table,
    format_value,
    higher_is_better,
    metric_columns,
    optimized_metric,
    print_table,
    short_names,
    sort_runs,
    throughput_of,
    to_markdown,
    varied_keys,
    write_csv,
)
from vitlab.reports.wandb_log import WandbRun, read_wandb_run, wandb_records

__all__ = [
    "PLOT_FILES",
    "REPEAT_KEYS",
    "Comparison",
    "Group",
    "NoRunsError",
    "Run",
    "Summary",
    "WandbRun",
    "cell_text",
    "comparison_table",
    "find_run_dirs",
    "flatten",
    "format_value",
    "group_runs",
    "higher_is_better",
    "is_run_dir",
    "load_run",
    "load_runs",
    "mean_table",
    "metric_columns",
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
    "repeat_keys",
    "run_label",
    "short_names",
    "sort_groups",
    "sort_runs",
    "throughput_of",
    "to_markdown",
    "varied_keys",
    "wandb_records",
    "write_csv",
    "write_report",
]
