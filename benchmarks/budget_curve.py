"""Accuracy against training budget: one ``reproduce.py`` grid per epoch budget, then one curve per method.

Every argument except ``--epochs``, ``--out`` and ``--title`` goes to ``benchmarks/reproduce.py`` as it is
(methods, seeds, jobs, overrides after ``--``). Budgets run in the given order, each into
``<out>/epochs<E>/`` (a rerun resumes, as ``reproduce.py`` does); then ``<out>/curve.md`` tabulates
test top-1 (mean ± sample std over seeds) per method and budget with the difference to the baseline,
and ``<out>/curve.png`` draws it.

Example (the README's CPU curve; ``results/budget_curve_cpu`` is the same with ``cifar_resnet8``)::

    python benchmarks/budget_curve.py --epochs 5 15 30 --out results/budget_curve_resnet20_cpu \\
        --data configs/data/fashion_mnist.yaml --model configs/model/cifar_resnet20.yaml \\
        --methods baseline cutmix random_cells attentive_cutmix_offline_112 --seeds 0 1 \\
        --jobs 2 --threads 1 --heatmap-cache \\
        -- --data.init_args.data_dir /usr/share/datasets/fashion-mnist --data.init_args.train_subset 3000 \\
        --data.init_args.val_split 2000
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402  (the sibling script)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="budget_curve.py",
        description="Run benchmarks/reproduce.py once per epoch budget and draw test top-1 against the budget."
        " Other arguments (and everything after `--`) go to reproduce.py.",
    )
    parser.add_argument("--epochs", nargs="+", type=int, required=True, help="the budgets, in epochs")
    parser.add_argument("--out", required=True, help="results folder: one sub-folder per budget, curve.md, curve.png")
    parser.add_argument("--title", default=None, help="title of the table and the plot")
    parser.add_argument("--report-only", action="store_true", help="only rebuild curve.md/png from finished runs")
    parser.add_argument("--dry-run", action="store_true", help="print each budget's run commands and exit")
    return parser


def curve_rows(out: Path, epochs: Sequence[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per method and budget, the :func:`reproduce.summarize` row of the finished runs in ``<out>/epochs<E>``."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for budget in epochs:
        path = out / f"epochs{budget}" / "runs.json"
        records = json.loads(path.read_text()) if path.is_file() else []
        methods = list(dict.fromkeys(record["method"] for record in records))
        for row in reproduce.summarize(records, methods):
            rows.setdefault(row["method"], {})[budget] = row
    return rows


def curve_table(rows: dict[str, dict[int, dict[str, Any]]], epochs: Sequence[int], title: str, command: str) -> str:
    """Markdown: test top-1 per method (rows) and budget (columns), and the difference to the baseline."""
    baseline = rows.get("baseline", {})
    header = "| method | " + " | ".join(f"{budget} epochs" for budget in epochs) + " |"
    lines = [
        f"# {title}",
        "",
        "Test top-1 (%), mean ± sample std over seeds (n); below it, Δ vs baseline ± its standard error.",
        "Per-run figures: `epochs<E>/table.md`.",
        "",
        header,
        "|---|" + "---|" * len(epochs),
    ]
    for method, by_budget in rows.items():
        cells, deltas = [], []
        for budget in epochs:
            row = by_budget.get(budget)
            cells.append("" if row is None else f"{reproduce._pm(row['mean'], row['std'])} (n={row['n']})")
            deltas.append("" if row is None else reproduce._delta(row, baseline.get(budget)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if method != "baseline" and any(deltas):
            lines.append(f"| Δ {method} | " + " | ".join(deltas) + " |")
    lines += ["", "Command:", "", "```", command, "```", ""]
    return "\n".join(lines)


def plot_curve(rows: dict[str, dict[int, dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, by_budget) in enumerate(rows.items()):
        budgets = sorted(b for b, row in by_budget.items() if row["n"])
        means = [by_budget[b]["mean"] for b in budgets]
        stds = [0.0 if math.isnan(by_budget[b]["std"]) else by_budget[b]["std"] for b in budgets]
        shift = [b * (1 + 0.015 * (i - len(rows) / 2)) for b in budgets]  # keeps the error bars apart
        ax.errorbar(shift, means, yerr=stds, marker="o", capsize=4, label=method, color=f"C{i}")
    ax.set_xlabel("training budget (epochs)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, overrides = reproduce.split_argv(argv)
    args, forwarded = build_parser().parse_known_args(own)
    if any(budget < 1 for budget in args.epochs) or len(set(args.epochs)) != len(args.epochs):
        raise SystemExit(f"budget_curve.py: expected distinct --epochs of at least 1, but got {args.epochs}.")
    if any(arg.startswith("--max-epochs") for arg in forwarded):
        raise SystemExit("budget_curve.py: give the budgets with --epochs, not --max-epochs.")
    out = Path(args.out)
    status = 0
    for budget in args.epochs:
        grid = [*forwarded, "--max-epochs", str(budget), "--out", str(out / f"epochs{budget}")]
        if args.report_only:
            grid.append("--report-only")
        if args.dry_run:
            grid.append("--dry-run")
        print(f"budget_curve.py: {budget} epochs", flush=True)
        status |= reproduce.main([*grid, "--", *overrides] if overrides else grid)
    if args.dry_run:
        return status
    shown = [arg for arg in own if arg != "--report-only"] + (["--", *overrides] if overrides else [])
    command = shlex.join([Path(sys.executable).name, "benchmarks/budget_curve.py", *shown])
    title = args.title or f"test top-1 against the training budget ({out.name})"
    rows = curve_rows(out, args.epochs)
    (out / "curve.md").write_text(curve_table(rows, args.epochs, title, command))
    plot_curve(rows, out / "curve.png", title)
    print((out / "curve.md").read_text())
    return status


if __name__ == "__main__":
    sys.exit(main())
