"""benchmarks/reproduce.py: the methods x seeds harness (arguments, summaries, a tiny real grid, resume)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lightning_acm.data import _write_idx

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "reproduce.py"


def _load_harness():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


reproduce = _load_harness()

DATA = str(REPO / "configs" / "data" / "fashion_mnist.yaml")
MODEL = str(REPO / "configs" / "model" / "cifar_resnet8.yaml")


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> Path:
    """A 200/40-image Fashion-MNIST in the IDX format, so that the test needs no installed data."""
    root = tmp_path / "fmnist"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("t10k", 40)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", torch.arange(n, dtype=torch.uint8) % 10)
    return root


def _tiny_overrides(data_dir: Path) -> list[str]:
    return [
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.val_split", "40",
        "--data.init_args.batch_size", "16",
        "--data.init_args.train_subset", "64",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1",
    ]  # fmt: skip


def _argv(out: Path, data_dir: Path, epochs: int = 1) -> list[str]:
    return [
        "--data", DATA, "--model", MODEL, "--methods", "baseline", "cutmix", "--seeds", "0", "1",
        "--max-epochs", str(epochs), "--jobs", "2", "--threads", "1", "--out", str(out),
        "--", *_tiny_overrides(data_dir),
    ]  # fmt: skip


# --------------------------------------------------------------------------- arguments


def test_help_mentions_resume_and_passthrough(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--seeds", "--methods", "--accelerator", "--heatmap-cache", "resumes", "`--`"):
        assert needle in text


def test_split_argv() -> None:
    assert reproduce.split_argv(["--out", "x", "--", "--trainer.max_epochs", "2"]) == (
        ["--out", "x"],
        ["--trainer.max_epochs", "2"],
    )
    assert reproduce.split_argv(["--out", "x"]) == (["--out", "x"], [])


def test_parse_method(tmp_path: Path) -> None:
    method = reproduce.parse_method("attentive_cutmix_offline")
    expected = (REPO / "configs" / "method" / "attentive_cutmix_offline.yaml").resolve()
    assert method.attentive and [Path(c).resolve() for c in method.configs] == [expected]
    assert not reproduce.parse_method("baseline").attentive
    assert not reproduce.parse_method("random_cells").attentive  # no teacher, so no heatmap cache
    custom = tmp_path / "m.yaml"
    custom.write_text("mixing:\n  class_path: lightning_acm.callbacks.MixUp\n")
    method = reproduce.parse_method(f"mine={custom}")
    assert method.name == "mine" and method.configs == [str(custom)] and not method.attentive


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_method", "does not exist"),
        ("name=", "NAME=PATH"),
        ("=x.yaml", "NAME=PATH"),
        ("m=/nope.yaml", "does not exist"),
    ],
)
def test_parse_method_errors(spec: str, match: str) -> None:
    with pytest.raises(SystemExit, match=match):
        reproduce.parse_method(spec)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--jobs", "0"], "--jobs to be >= 1"),
        (["--seeds", "1", "1"], "distinct --seeds"),
        (["--methods", "baseline", "baseline"], "distinct method names"),
    ],
)
def test_main_argument_errors(tmp_path: Path, extra: list[str], match: str) -> None:
    argv = ["--data", DATA, "--model", MODEL, "--out", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit, match=match):
        reproduce.main(argv)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        reproduce.main(["--data", "nope.yaml", "--model", MODEL, "--out", str(tmp_path)])


def test_dry_run_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = [
        "--data", DATA, "--model", MODEL, "--methods", "baseline", "attentive_cutmix_offline_112",
        "--seeds", "3", "--max-epochs", "2", "--accelerator", "gpu", "--heatmap-cache", "--out", str(out),
        "--dry-run", "--", "--trainer.precision", "bf16-mixed",
    ]  # fmt: skip
    assert reproduce.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("[todo]") for line in lines)
    baseline, attentive = lines
    for line in lines:
        assert "fit --config" in line and "--seed_everything 3 --test_after_fit true" in line
        assert "--trainer.max_epochs 2 --trainer.accelerator gpu --trainer.devices 1" in line
        assert line.endswith("--trainer.precision bf16-mixed")  # passed through last, so it wins
    assert "heatmap_cache" not in baseline and "record_augmentation" not in baseline
    cache = out.resolve() / "heatmap_cache" / "attentive_cutmix_offline_112.pt"
    assert f"--mixing.init_args.heatmap_cache '{json.dumps({'path': str(cache)})}'" in attentive
    assert "--data.init_args.record_augmentation true" in attentive
    assert not out.exists()  # a dry run writes nothing


# --------------------------------------------------------------------------- summaries


def _record(method: str, seed: int, acc: float, status: str = "ok") -> dict:
    return {"method": method, "seed": seed, "status": status, "test_acc": acc, "wall_s": 60.0}


def test_summarize_mean_and_sample_std() -> None:
    records = [_record("baseline", 0, 0.90), _record("baseline", 1, 0.92), _record("baseline", 2, 0.94),
               _record("cutmix", 0, 0.91), _record("cutmix", 1, 0.0, status="failed"),
               _record("mixup", 0, 0.93), _record("mixup", 1, 0.95)]  # fmt: skip
    baseline, cutmix, mixup, other = reproduce.summarize(records, ["baseline", "cutmix", "mixup", "other"])
    assert baseline["n"] == 3 and baseline["seeds"] == [0, 1, 2]
    assert baseline["mean"] == pytest.approx(92.0) and baseline["std"] == pytest.approx(2.0)  # n - 1
    assert cutmix["n"] == 1 and cutmix["failed"] == 1 and math.isnan(cutmix["std"])
    assert other["n"] == 0 and math.isnan(other["mean"])
    table = reproduce.markdown_table(
        [baseline, cutmix, mixup, other],
        title="t",
        command="python benchmarks/reproduce.py ...",
        info={"cpu": "X", "gpu": None, "torch": "2"},
        grid=(
            grid := {
                "runs_ok": 4,
                "runs_total": 6,
                "span": "2.0 min",
                "jobs": 1,
                "threads": None,
                "example_run": "x",
                "load": "mean 1.00",
                "code": ["abc1234"],
            }
        ),  # fmt: skip
    )
    assert "| baseline | 92.00 ± 2.00 |  | 3 | 0, 1, 2 | 90.00, 92.00, 94.00 | 1.0 min |" in table
    assert "| cutmix | 91.00 | -1.00 | 1 (1 failed) | 0 |" in table
    assert "| mixup | 94.00 ± 1.41 | +2.00 ± 1.53 | 2 |" in table  # sqrt(2 / 2 + 4 / 3)
    assert "| other | n/a |" in table
    assert "4 of 6 runs finished" in table and "cpu X" in table and "gpu" not in table.split("Machine:")[1]
    two = reproduce.markdown_table(
        [baseline, cutmix, mixup], title="t", command="c", info={}, grid={**grid, "note": None},
        compare=["baseline", "mixup"],
    )  # fmt: skip
    assert "| method | test top-1 (%) | Δ vs baseline | Δ vs mixup | n |" in two
    assert "| cutmix | 91.00 | -1.00 | -3.00 | 1 (1 failed) | 0 |" in two
    assert "| mixup | 94.00 ± 1.41 | +2.00 ± 1.53 |  | 2 |" in two


def test_failed_run_writes_no_result(tmp_path: Path) -> None:
    method = reproduce.Method("baseline", [])
    run = reproduce.Run(method, 0, tmp_path, ["python", "-c", "pass"], {}, {"version": 1})
    record = reproduce.finish(run, 1, 3.0, keep_checkpoints=False)
    assert record["status"] == "failed" and record["returncode"] == 1
    assert not (tmp_path / reproduce.RESULT_FILE).exists()  # so that a rerun retries it


def test_cached_method_seeds_wait_for_the_cache_file(tmp_path: Path) -> None:
    import os
    import time

    acm = reproduce.Method("acm", [], attentive=True)
    base = reproduce.Method("baseline", [])
    assert acm.attentive and not base.attentive
    primer, other = (reproduce.Run(acm, s, tmp_path / str(s), [], {}, {}) for s in (0, 1))
    baseline = reproduce.Run(base, 0, tmp_path / "b", [], {}, {})
    primers = {"acm": primer}
    begun = time.time()
    assert reproduce.startable(primer, primers, tmp_path, begun)
    assert reproduce.startable(baseline, primers, tmp_path, begun)
    assert not reproduce.startable(other, primers, tmp_path, begun)  # no cache file yet
    path = reproduce.cache_file(tmp_path, "acm")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"old")
    os.utime(path, (begun - 3600, begun - 3600))
    assert not reproduce.startable(other, primers, tmp_path, begun)  # a stale file from before the grid
    os.utime(path, (begun + 1, begun + 1))
    assert reproduce.startable(other, primers, tmp_path, begun)  # the primer wrote it
    path.unlink()
    primer.result = {"status": "failed"}
    assert reproduce.startable(other, primers, tmp_path, begun)  # the primer ended without a cache
    assert reproduce.startable(other, {}, None, begun)


def test_machine_info() -> None:
    info = reproduce.machine()
    assert info["cores"] >= 1 and info["torch"] == torch.__version__ and "cpu" in info


# --------------------------------------------------------------------------- a real tiny grid


@pytest.mark.slow
def test_tiny_grid_writes_outputs_and_resumes(
    tmp_path: Path, fake_fashion_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[str] = []
    real_launch = reproduce._launch

    def counting_launch(run):
        launched.append(run.key)
        real_launch(run)

    monkeypatch.setattr(reproduce, "_launch", counting_launch)
    out = tmp_path / "out"
    argv = _argv(out, fake_fashion_mnist)
    assert reproduce.main(argv) == 0
    assert sorted(launched) == ["baseline/seed0", "baseline/seed1", "cutmix/seed0", "cutmix/seed1"]

    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 4 and all(r["status"] == "ok" and 0.0 <= r["test_acc"] <= 1.0 for r in runs)
    assert {(r["method"], r["seed"]) for r in runs} == {("baseline", 0), ("baseline", 1), ("cutmix", 0), ("cutmix", 1)}
    assert all("--seed_everything" in r["command"] and r["wall_s"] > 0 and "code" in r for r in runs)
    assert (out / "runs.csv").read_text().count("\n") == 5
    table = (out / "table.md").read_text()
    assert "| baseline |" in table and "| cutmix |" in table and "±" in table
    assert "benchmarks/reproduce.py" in table and "Machine: cpu" in table and f"torch {torch.__version__}" in table
    assert "Code of the runs" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.ckpt"))  # checkpoints are removed unless --keep-checkpoints

    # Resume: nothing to run, finished results untouched.
    results = sorted(out.rglob(reproduce.RESULT_FILE))
    mtimes = [p.stat().st_mtime_ns for p in results]
    launched.clear()
    assert reproduce.main(argv) == 0
    assert launched == []
    assert [p.stat().st_mtime_ns for p in results] == mtimes

    # An interrupted run (no result.json) is the only one rerun.
    (out / "runs" / "cutmix" / "seed1" / reproduce.RESULT_FILE).unlink()
    assert reproduce.main(argv) == 0
    assert launched == ["cutmix/seed1"]
    assert len(json.loads((out / "runs.json").read_text())) == 4

    # Another budget in the same folder is refused rather than mixed in.
    with pytest.raises(SystemExit, match="another budget"):
        reproduce.main(_argv(out, fake_fashion_mnist, epochs=2))


# --------------------------------------------------------------------------- the grid's student and configs


def test_cifar_resnet_students() -> None:
    from lightning_acm.model import CifarResNet, _build_classifier

    resnet8 = _build_classifier("cifar_resnet8", num_classes=10, small_input=True)
    resnet20 = _build_classifier("cifar_resnet20", num_classes=10, in_channels=1)
    assert isinstance(resnet8, CifarResNet) and sum(p.numel() for p in resnet8.parameters()) == 78042
    assert sum(p.numel() for p in resnet20.parameters()) == 272474 - 2 * 16 * 9  # the stem sees one channel
    assert resnet8(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet20(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="Expected `weights` to be None for `arch='cifar_resnet8'`"):
        _build_classifier("cifar_resnet8", weights="DEFAULT")
    with pytest.raises(ValueError, match="Expected `blocks` to be a positive int"):
        CifarResNet(0)


@pytest.mark.parametrize("model", ["cifar_resnet8", "cifar_resnet20"])
def test_grid_configs_parse(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_acm.callbacks import AttentiveCutMix
    from lightning_acm.cli import AttentiveCutMixCLI

    configs = ["configs/data/fashion_mnist.yaml", f"configs/model/{model}.yaml",
               "configs/method/attentive_cutmix_offline_112.yaml"]  # fmt: skip
    args = [arg for path in configs for arg in ("--config", str(REPO / path))] + ["--seed_everything", "0"]
    monkeypatch.setattr(sys, "argv", ["lightning-acm"])
    cli = AttentiveCutMixCLI(args=args, run=False)
    assert cli.model.hparams.arch == model
    mixing = cli.config_init["mixing"]
    assert isinstance(mixing, AttentiveCutMix)
    assert (mixing.teacher.layer, mixing.teacher.input_size, mixing.grid_size) == ("_blocks.10", 112, (7, 7))


def test_grid_command_drops_report_only_arguments() -> None:
    own = ["--out", "x", "--report-only", "--note", "a note", "--title=t", "--seeds", "0"]
    assert reproduce._grid_command(own) == ["--out", "x", "--seeds", "0"]


def test_gpu_control_grid_script_plans_the_five_methods(tmp_path: Path) -> None:
    import os
    import subprocess

    env = {**os.environ, "DRY_RUN": "1", "SEEDS": "0 1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = REPO / "benchmarks" / "gpu_control_grid.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    methods = ["baseline", "mixup", "cutmix", "random_cells", "attentive_cutmix_offline"]
    assert [line.split(":")[0] for line in lines] == [f"[todo] {m}/seed{s}" for s in (0, 1) for m in methods]
    assert all("--trainer.accelerator gpu" in line and "--trainer.precision bf16-mixed" in line for line in lines)
    assert "--mixing.init_args.heatmap_cache" in lines[4] and "heatmap_cache" not in lines[3]  # random cells: none


def test_table_says_how_often_the_cache_was_filled() -> None:
    def cached(seed: int, fill: float) -> dict:
        return {**_record("acm", seed, 0.9), "wall_s": 60.0 + fill, "cache_fill_s": fill}

    grid = {"runs_ok": 3, "runs_total": 3, "span": "1 min", "jobs": 1, "example_run": "x", "load": "-", "code": []}
    once = reproduce.summarize([cached(0, 120.0), _record("acm", 1, 0.9)], ["acm"])
    twice = reproduce.summarize([cached(0, 120.0), _record("acm", 1, 0.9), cached(2, 60.0)], ["acm"])
    table = reproduce.markdown_table(once, title="t", command="c", info={}, grid=grid)
    assert "| 1.0 min (+ 2.0 min once: teacher heatmap cache) |" in table
    table = reproduce.markdown_table(twice, title="t", command="c", info={}, grid=grid)
    assert "| 1.0 min (+ 3.0 min in 2 fills: teacher heatmap cache) |" in table
