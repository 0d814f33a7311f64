"""benchmarks/budget_curve.py: one reproduce.py grid per budget, and the curve built from their runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
budget_curve = importlib.import_module("budget_curve")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _write_runs(folder: Path, accs: dict[str, list[float]]) -> None:
    folder.mkdir(parents=True)
    records = [
        {"method": method, "seed": seed, "status": "ok", "test_acc": acc, "wall_s": 60.0}
        for method, values in accs.items()
        for seed, acc in enumerate(values)
    ]
    (folder / "runs.json").write_text(json.dumps(records))


def test_each_budget_is_one_grid_and_the_curve_is_built_from_their_runs(tmp_path, monkeypatch):
    calls: list[list[str]] = []

    def fake_grid(argv: list[str]) -> int:
        calls.append(argv)
        budget = argv[argv.index("--max-epochs") + 1]
        scale = {"5": 0.0, "15": 0.02}[budget]
        _write_runs(
            Path(argv[argv.index("--out") + 1]),
            {"baseline": [0.80 + scale, 0.82 + scale], "cutmix": [0.78 + 2 * scale, 0.80 + 2 * scale]},
        )
        return 0

    monkeypatch.setattr(budget_curve.reproduce, "main", fake_grid)
    out = tmp_path / "curve"
    argv = ["--epochs", "5", "15", "--out", str(out), "--methods", "baseline", "cutmix", "--jobs", "2",
            "--", "--data.init_args.train_subset", "3000"]  # fmt: skip
    assert budget_curve.main(argv) == 0
    assert [call[call.index("--max-epochs") + 1] for call in calls] == ["5", "15"]
    assert calls[0][:4] == ["--methods", "baseline", "cutmix", "--jobs"]
    assert calls[1][calls[1].index("--out") + 1] == str(out / "epochs15")
    assert calls[1][-2:] == ["--data.init_args.train_subset", "3000"]
    table = (out / "curve.md").read_text()
    assert "| method | 5 epochs | 15 epochs |" in table
    assert "| baseline | 81.00 ± 1.41 (n=2) | 83.00 ± 1.41 (n=2) |" in table
    assert "| cutmix | 79.00 ± 1.41 (n=2) | 83.00 ± 1.41 (n=2) |" in table
    assert "| Δ cutmix | -2.00 ± 1.41 | +0.00 ± 1.41 |" in table
    assert "budget_curve.py --epochs 5 15" in table
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_reaches_every_grid(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(budget_curve.reproduce, "main", lambda argv: calls.append(argv) or 0)
    budget_curve.main(["--epochs", "3", "--out", str(tmp_path), "--report-only", "--methods", "baseline"])
    assert "--report-only" in calls[0]
    assert "| method | 3 epochs |" in (tmp_path / "curve.md").read_text()


def test_dry_run_prints_every_grid_and_builds_no_curve(tmp_path, capsys):
    out = tmp_path / "curve"
    argv = ["--epochs", "2", "3", "--out", str(out), "--methods", "baseline", "--seeds", "0", "--dry-run"]
    argv += ["--data", str(CONFIGS / "data/fashion_mnist.yaml"), "--model", str(CONFIGS / "model/cifar_resnet8.yaml")]
    assert budget_curve.main(argv) == 0
    printed = capsys.readouterr().out
    assert "--trainer.max_epochs 2" in printed and "--trainer.max_epochs 3" in printed
    assert not (out / "curve.md").exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--epochs", "5", "5", "--out", "x"], "distinct --epochs"),
        (["--epochs", "0", "--out", "x"], "at least 1"),
        (["--epochs", "5", "--out", "x", "--max-epochs", "3"], "not --max-epochs"),
    ],
)
def test_bad_budgets_fail_early(argv, match):
    with pytest.raises(SystemExit, match=match):
        budget_curve.main(argv)
