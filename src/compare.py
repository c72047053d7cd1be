"""Compare runs: `python src/compare.py logs/train/multiruns/<time>` (or run folders + `--out DIR`).

An eval sweep (`logs/eval/multiruns/<time>`, e.g. one checkpoint at several patch sizes)
compares the same way, by `test/acc` and the test loop's throughput.

Prints a table of the jobs (varied overrides, status, final metrics, throughput), best
first, and writes `compare.md`, `compare.csv` and PNG plots beside them. A sweep over
`seed` or `data.fold` also gets the mean ± std of each configuration's repeats, printed
and written to `compare_mean.md` and `compare_mean.csv`. No server needed: everything is
read from the run folders (`vitlab.reports`).
"""

import argparse
import sys
from pathlib import Path

import rich
from rich.markup import escape

from vitlab import reports
from vitlab.errors import VitlabError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="a multirun folder, or run folders")
    parser.add_argument(
        "--metric",
        help="sort by this final metric (default: the runs' optimized_metric, "
        "else test/acc for eval runs, else val/acc)",
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the table and plots (default: the folder given)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None and len(args.folders) > 1:
        print("Error: several folders given; say where to write with --out DIR", file=sys.stderr)
        return 2
    try:
        runs = reports.load_runs(args.folders)
    except VitlabError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    metric = args.metric or reports.optimized_metric(runs)
    runs = reports.sort_runs(runs, metric)
    varied = reports.varied_keys(runs)
    reports.print_table(reports.comparison_table(runs, varied, metric), title=f"Runs by {metric}")
    means = reports.mean_table(runs, metric)
    if means is not None:
        repeats = ", ".join(reports.repeat_keys(varied))
        reports.print_table(means, title=f"Mean ± std over {repeats}, by {metric}")
    written = reports.write_report(runs, args.out or args.folders[0], metric)
    rich.print(f"[bold]Wrote[/bold] {escape(', '.join(str(p) for p in written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
