"""Reproduction harness: a methods x seeds grid of ``lightning-acm fit`` runs, summarised honestly.

Each run is a subprocess of the CLI (``python -m lightning_acm fit --config DATA --config MODEL
--config METHOD --seed_everything SEED --test_after_fit true ...``) with the same budget; extra CLI
overrides after ``--`` go to every run. The results folder receives:

* ``runs/<method>/seed<k>/result.json`` -- one file per *finished* run (test top-1, val top-1,
  wall time, the exact command). A rerun of the same command skips these runs, so an interrupted
  grid resumes where it stopped; a different budget in the same folder is refused.
* ``runs.json`` and ``runs.csv`` -- every run of the grid.
* ``table.md`` -- mean +- std (sample std, n - 1) of test top-1 per method, the seeds, time per
  run, the command line that produced it and the machine (CPU, cores, torch, GPU).
* ``plot.png`` -- per-seed points and mean +- std bars per method.

Runs test the *final* weights (no checkpoint is selected on validation unless a config adds a
monitored ``ModelCheckpoint``). With ``--heatmap-cache``, Attentive CutMix methods compute the
teacher's heatmaps once into ``<out>/heatmap_cache/<method>.pt`` and every seed reuses them; the
first seed of such a method starts first, and its other seeds start once it has written the cache
(or has ended).

Example (the CPU grid of the README)::

    python benchmarks/reproduce.py --data configs/data/fashion_mnist.yaml \\
        --model configs/model/cifar_resnet8.yaml \\
        --methods baseline mixup cutmix attentive_cutmix_offline_112 --seeds 0 1 2 \\
        --max-epochs 4 --jobs 2 --threads 1 --heatmap-cache --out results/fashion_mnist_cpu \\
        -- --data.init_args.data_dir /usr/share/datasets/fashion-mnist

On a GPU, add ``--accelerator gpu`` (and e.g. ``-- --trainer.precision bf16-mixed``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
METHOD_DIR = REPO / "configs" / "method"
RESULT_FILE = "result.json"
LOAD_FILE = "loadavg.csv"
_CACHE_LINE = re.compile(r"computed (\d+) heatmaps .* in ([\d.]+) s")
# Every run of a grid shares these; a folder holding runs with another signature is not reused.
SIGNATURE_VERSION = 1


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reproduce.py",
        description=(
            "Run a methods x seeds grid of `lightning-acm fit --test_after_fit true` with a fixed budget and write"
            " table.md, plot.png, runs.json and runs.csv to --out. Arguments after `--` are passed to every run."
            " Rerunning the same command resumes: finished runs (runs/<method>/seed<k>/result.json) are skipped."
        ),
        epilog="Example" + __doc__.split("Example", 1)[1].replace("::", ":") if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="data config, e.g. configs/data/fashion_mnist.yaml")
    parser.add_argument("--model", required=True, help="model config, e.g. configs/model/cifar_resnet8.yaml")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["baseline", "mixup", "cutmix", "attentive_cutmix_offline"],
        help="NAME (configs/method/NAME.yaml) or NAME=PATH[,PATH...] (configs composed in order)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="values of --seed_everything")
    parser.add_argument("--out", required=True, help="results folder (created; reused to resume)")
    parser.add_argument("--max-epochs", type=int, default=None, help="--trainer.max_epochs of every run")
    parser.add_argument("--accelerator", default=None, help="--trainer.accelerator of every run (cpu, gpu, auto)")
    parser.add_argument("--devices", default=None, help="--trainer.devices of every run (default 1 with --accelerator)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at the same time (CPU: one per core with --threads 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS/MKL_NUM_THREADS of each run (default: unset)"
    )
    parser.add_argument(
        "--heatmap-cache",
        action="store_true",
        help="Attentive CutMix methods compute the teacher's heatmaps once into <out>/heatmap_cache/<method>.pt"
        " (adds --data.init_args.record_augmentation true and --mixing.init_args.heatmap_cache true)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=["baseline"],
        help="methods the table gives each mean's difference to, with its standard error (e.g. baseline random_cells)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's .ckpt files")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--report-only", action="store_true", help="only rebuild table/plot/runs from finished runs")
    parser.add_argument("--title", default=None, help="title of the table and the plot")
    parser.add_argument(
        "--note", default=None, help="a paragraph added to table.md (e.g. what changed during the grid)"
    )
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(harness arguments, CLI overrides)``: everything after the first ``--`` is passed through."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


@dataclass
class Method:
    name: str
    configs: list[str]
    attentive: bool = False


def parse_method(spec: str) -> Method:
    name, sep, paths = spec.partition("=")
    if not name or (sep and not paths):
        raise SystemExit(f"reproduce.py: expected a method as NAME or NAME=PATH[,PATH], but got {spec!r}.")
    configs = paths.split(",") if sep else [_short(METHOD_DIR / f"{name}.yaml")]
    for path in configs:
        if not Path(path).is_file():
            raise SystemExit(f"reproduce.py: the config {path!r} of method {name!r} does not exist.")
    return Method(name, configs, any(_is_attentive(path) for path in configs))


def _short(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands), else absolute."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else relative


def _is_attentive(path: str) -> bool:
    """Whether the config runs Attentive CutMix with a teacher (random cells have none to cache)."""
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    mixing = config.get("mixing") if isinstance(config, dict) else None
    if not (isinstance(mixing, dict) and str(mixing.get("class_path", "")).endswith("AttentiveCutMix")):
        return False
    teacher = (mixing.get("init_args") or {}).get("teacher")
    return (teacher.get("source") if isinstance(teacher, dict) else teacher) != "random"


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    method: Method
    seed: int
    directory: Path
    command: list[str]
    env: dict[str, str]
    signature: dict[str, Any]
    result: Optional[dict[str, Any]] = None
    process: Optional[subprocess.Popen] = None
    started: float = 0.0
    log: Any = None
    code: Optional[str] = None

    @property
    def key(self) -> str:
        return f"{self.method.name}/seed{self.seed}"


def cache_file(out: Path, method_name: str) -> Path:
    """The heatmap cache that the runs of ``method_name`` share with ``--heatmap-cache``."""
    return out.resolve() / "heatmap_cache" / f"{method_name}.pt"


def run_command(
    args: argparse.Namespace, method: Method, seed: int, directory: Path, overrides: list[str]
) -> list[str]:
    """The ``lightning-acm fit`` command of one run (the harness's own settings come before ``overrides``)."""
    command = [sys.executable, "-m", "lightning_acm", "fit", "--config", args.data, "--config", args.model]
    for config in method.configs:
        command += ["--config", config]
    command += [
        "--seed_everything", str(seed),
        "--test_after_fit", "true",
        "--trainer.default_root_dir", str(directory),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(directory),
        "--trainer.logger.init_args.name", "logs",
        "--trainer.logger.init_args.version", "0",
    ]  # fmt: skip
    if args.max_epochs is not None:
        command += ["--trainer.max_epochs", str(args.max_epochs)]
    if args.accelerator is not None:
        command += ["--trainer.accelerator", args.accelerator, "--trainer.devices", str(args.devices or 1)]
    elif args.devices is not None:
        command += ["--trainer.devices", str(args.devices)]
    if args.heatmap_cache and method.attentive:
        cache = cache_file(Path(args.out), method.name)
        command += [
            "--data.init_args.record_augmentation", "true",
            "--mixing.init_args.heatmap_cache", json.dumps({"path": str(cache)}),
        ]  # fmt: skip
    return command + list(overrides)


def signature(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """What every run of one grid must share: a folder with runs of another signature is not mixed in."""
    return {
        "version": SIGNATURE_VERSION,
        "data": args.data,
        "model": args.model,
        "max_epochs": args.max_epochs,
        "accelerator": args.accelerator,
        "devices": args.devices,
        "heatmap_cache": args.heatmap_cache,
        "overrides": list(overrides),
    }


def read_metrics(directory: Path) -> dict[str, Any]:
    """Test and validation metrics from the run's ``CSVLogger`` file."""
    path = directory / "logs" / "version_0" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))

    def column(name: str) -> list[float]:
        return [float(row[name]) for row in rows if row.get(name) not in (None, "")]

    out: dict[str, Any] = {}
    for name in ("test/acc", "test/acc_top5", "test/loss"):
        values = column(name)
        if values:
            out[name.replace("/", "_")] = values[-1]
    val = column("val/acc")
    if val:
        out["val_acc_last"], out["val_acc_best"], out["val_epochs"] = val[-1], max(val), len(val)
    return out


def cache_fill_seconds(directory: Path) -> Optional[float]:
    """Seconds the run spent filling the heatmap cache (from its log), or None if it loaded or had none."""
    log = directory / "run.log"
    if not log.is_file():
        return None
    found = _CACHE_LINE.search(log.read_text(errors="replace"))
    return float(found.group(2)) if found else None


def finish(run: Run, returncode: int, wall: float, keep_checkpoints: bool) -> dict[str, Any]:
    metrics = read_metrics(run.directory)
    ok = returncode == 0 and "test_acc" in metrics
    record = {
        "method": run.method.name,
        "seed": run.seed,
        "status": "ok" if ok else "failed",
        "returncode": returncode,
        **metrics,
        "wall_s": round(wall, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join(run.command),
        "signature": run.signature,
        "load_1min_end": round(os.getloadavg()[0], 2),
        "code": run.code,
    }
    fill = cache_fill_seconds(run.directory)
    if fill is not None:
        record["cache_fill_s"] = fill
    if not keep_checkpoints:
        for checkpoint in run.directory.rglob("*.ckpt"):
            checkpoint.unlink()
    if ok:
        tmp = run.directory / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(run.directory / RESULT_FILE)  # atomic: a killed grid never leaves half a result
    return record


def plan(args: argparse.Namespace, methods: list[Method], overrides: list[str]) -> list[Run]:
    sig = signature(args, overrides)
    env = dict(os.environ)
    if args.threads:
        env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    runs = []
    for seed in args.seeds:
        for method in methods:
            directory = Path(args.out).resolve() / "runs" / method.name / f"seed{seed}"
            run = Run(method, seed, directory, run_command(args, method, seed, directory, overrides), env, sig)
            done = directory / RESULT_FILE
            if done.is_file():
                previous = json.loads(done.read_text())
                if previous.get("signature") != sig:
                    raise SystemExit(
                        f"reproduce.py: {done} was made with another budget or data ({previous.get('signature')} !="
                        f" {sig}). Use another --out, or delete that folder to rerun it."
                    )
                run.result = previous
            runs.append(run)
    return runs


def _launch(run: Run) -> None:
    # A run without result.json was interrupted or failed: start it from scratch, with no stale checkpoint.
    shutil.rmtree(run.directory, ignore_errors=True)
    run.directory.mkdir(parents=True)
    run.log = open(run.directory / "run.log", "w")
    run.log.write("$ " + shlex.join(run.command) + "\n\n")
    run.log.flush()
    run.code = git_state()
    run.started = time.perf_counter()
    run.process = subprocess.Popen(run.command, stdout=run.log, stderr=subprocess.STDOUT, env=run.env)
    print(f"[{time.strftime('%H:%M:%S')}] start {run.key}", flush=True)


def execute(runs: list[Run], jobs: int, keep_checkpoints: bool, cache_dir: Optional[Path], load_file: Path) -> None:
    """Run the unfinished runs, ``jobs`` at a time.

    With a heatmap cache (``cache_dir``: the grid's folder), the first unfinished seed of an
    Attentive CutMix method whose cache has not been made starts first; the method's other seeds
    wait until it has written the cache file (or has ended), so the teacher runs once per method.
    The 1-minute load average is appended to ``load_file`` every 30 s (a shared machine slows runs down).
    """
    if not load_file.is_file():
        load_file.write_text("time,load_1min\n")
    begun = time.time()
    last_sample = 0.0
    pending = [run for run in runs if run.result is None]
    # The teacher is the long pole: start the cache-filling runs first.
    primers: dict[str, Run] = {}
    if cache_dir is not None:
        for run in pending:
            if run.method.attentive and run.method.name not in primers:
                cache_done = any(r.result is not None for r in runs if r.method.name == run.method.name)
                if not cache_done:
                    primers[run.method.name] = run
        pending.sort(key=lambda run: run not in primers.values())
    active: list[Run] = []
    while pending or active:
        if time.time() - last_sample >= 30:
            last_sample = time.time()
            with open(load_file, "a") as handle:
                handle.write(f"{int(last_sample)},{os.getloadavg()[0]:.2f}\n")
        for run in [r for r in active if r.process is not None and r.process.poll() is not None]:
            active.remove(run)
            assert run.process is not None
            wall = time.perf_counter() - run.started
            run.log.close()
            run.result = finish(run, run.process.returncode, wall, keep_checkpoints)
            acc = run.result.get("test_acc")
            shown = f"test top-1 {100 * acc:.2f}%" if acc is not None else f"FAILED (see {run.directory / 'run.log'})"
            print(f"[{time.strftime('%H:%M:%S')}] done  {run.key}: {shown} in {wall:.0f} s", flush=True)
        while pending and len(active) < jobs:
            ready = [r for r in pending if startable(r, primers, cache_dir, begun)]
            if not ready:
                break
            pending.remove(ready[0])
            _launch(ready[0])
            active.append(ready[0])
        time.sleep(0.5)


def startable(run: Run, primers: dict[str, Run], cache_dir: Optional[Path], begun: float) -> bool:
    """Whether ``run`` may start: it fills its method's cache, or that cache is there (written since ``begun``)."""
    primer = primers.get(run.method.name)
    if primer is None or primer is run or primer.result is not None:
        return True
    assert cache_dir is not None
    path = cache_file(cache_dir, run.method.name)
    try:
        return path.stat().st_mtime > begun - 2.0  # (a margin for coarse file-system clocks)
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and GPU of this machine."""
    import lightning
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info["git (at report time)"] = git_state()
    return info


def git_state() -> Optional[str]:
    """The checkout's short commit, with ``+uncommitted`` when the package or configs differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "lightning_acm", "configs"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def summarize(records: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """Per method: n, seeds, mean, sample std and the values of test top-1 (in %), and wall time per run."""
    rows = []
    for method in methods:
        ok = sorted((r for r in records if r["method"] == method and r["status"] == "ok"), key=lambda r: r["seed"])
        accs = [100 * r["test_acc"] for r in ok]
        # The first run of a cached method (per sitting of the grid) also filled the cache: reported apart.
        walls = [r["wall_s"] - r.get("cache_fill_s", 0.0) for r in ok]
        fills = [r["cache_fill_s"] for r in ok if r.get("cache_fill_s")]
        rows.append(
            {
                "method": method,
                "n": len(ok),
                "seeds": [r["seed"] for r in ok],
                "values": accs,
                "mean": statistics.fmean(accs) if accs else math.nan,
                "std": statistics.stdev(accs) if len(accs) > 1 else math.nan,
                "wall_mean_s": statistics.fmean(walls) if walls else math.nan,
                "cache_fill_s": sum(fills),
                "cache_fills": len(fills),
                "failed": sum(1 for r in records if r["method"] == method and r["status"] != "ok"),
            }
        )
    return rows


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _delta(row: dict[str, Any], reference: Optional[dict[str, Any]]) -> str:
    """``row``'s mean minus ``reference``'s, ± sqrt(std² / n + std_ref² / n_ref) when both have two runs or more."""
    if reference is None or row is reference or not row["n"]:
        return ""
    delta = f"{row['mean'] - reference['mean']:+.2f}"
    if row["n"] > 1 and reference["n"] > 1:
        delta += f" ± {math.sqrt(row['std'] ** 2 / row['n'] + reference['std'] ** 2 / reference['n']):.2f}"
    return delta


def markdown_table(
    rows: list[dict[str, Any]],
    *,
    title: str,
    command: str,
    info: dict[str, Any],
    grid: dict[str, Any],
    compare: Sequence[str] = ("baseline",),
) -> str:
    references = {name: next((row for row in rows if row["method"] == name and row["n"]), None) for name in compare}
    lines = [
        f"# {title}",
        "",
        "Test top-1 (%) of the final weights, mean ± sample std (n - 1) over seeds. Δ is the difference of the means",
        "from the named method ± its standard error sqrt(std² / n + std_ref² / n_ref).",
        "",
        "| method | test top-1 (%) | "
        + "".join(f"Δ vs {name} | " for name in compare)
        + "n | seeds | per seed | time / run |",
        "|---|---|" + "---|" * len(compare) + "---|---|---|---|",
    ]
    for row in rows:
        deltas = "".join(f" {_delta(row, reference)} |" for reference in references.values())
        per_seed = ", ".join(f"{v:.2f}" for v in row["values"])
        wall = "n/a" if math.isnan(row["wall_mean_s"]) else f"{row['wall_mean_s'] / 60:.1f} min"
        if row.get("cache_fill_s"):
            times = "once" if row["cache_fills"] == 1 else f"in {row['cache_fills']} fills"
            wall += f" (+ {row['cache_fill_s'] / 60:.1f} min {times}: teacher heatmap cache)"
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        seeds = ", ".join(map(str, row["seeds"]))
        lines.append(
            f"| {row['method']} | {_pm(row['mean'], row['std'])} |{deltas} {row['n']}{failed} | {seeds} |"
            f" {per_seed} | {wall} |"
        )
    lines += [
        "",
        f"Grid: {grid['runs_ok']} of {grid['runs_total']} runs finished; {grid['span']} from the first run's start to"
        f" the last run's end, with {grid['jobs']} run(s) at a time"
        + (f", {grid['threads']} thread(s) each" if grid.get("threads") else "")
        + "; time / run is the wall time of one run's subprocess, start-up and test included.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Each run:",
        "",
        "```",
        grid["example_run"],
        "```",
        "",
        "Machine: " + "; ".join(f"{key} {value}" for key, value in info.items() if value is not None),
        "",
        "Code of the runs (git commit at each run's start): " + (", ".join(grid["code"]) or "not recorded") + ".",
        "",
        f"Load average (1 min) during the grid: {grid['load']} (other work on the machine slows the runs down).",
        "",
    ]
    if grid.get("note"):
        lines += [f"Note: {grid['note']}", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * max(3, len(rows)) + 1, 4))
    for i, row in enumerate(rows):
        values = row["values"]
        offsets = [(j - (len(values) - 1) / 2) * 0.06 for j in range(len(values))]
        ax.scatter([i + o for o in offsets], values, s=18, color="0.45", zorder=3, label="seed" if i == 0 else None)
        if values:
            std = 0.0 if math.isnan(row["std"]) else row["std"]
            ax.errorbar(i + 0.25, row["mean"], yerr=std, fmt="o", color=f"C{i}", capsize=6, markersize=7,
                        label=None)  # fmt: skip
            ax.annotate(f"{row['mean']:.2f}", (i + 0.32, row["mean"]), va="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{row['method']}\n(n={row['n']})" for row in rows], fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(-0.5, len(rows) - 0.3)
    fig.text(0.99, 0.01, "grey: one seed each; colour: mean ± std", ha="right", fontsize=7, color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _span(records: list[dict[str, Any]]) -> tuple[float, float]:
    """(first start, last end) of the runs in seconds since the epoch, from their end times and durations."""
    ends = [time.mktime(time.strptime(r["finished"], "%Y-%m-%d %H:%M:%S")) for r in records]
    starts = [end - r["wall_s"] for end, r in zip(ends, records, strict=True)]
    return min(starts), max(ends)


def _load_summary(path: Path, start: float, end: float) -> str:
    samples = []
    if path.is_file():
        with open(path, newline="") as handle:
            samples = [float(row["load_1min"]) for row in csv.DictReader(handle) if start <= float(row["time"]) <= end]
    if not samples:
        return f"{os.getloadavg()[0]:.2f} now (no samples in {path.name})"
    return f"mean {statistics.fmean(samples):.2f}, max {max(samples):.2f} over {len(samples)} samples ({path.name})"


def report(
    args: argparse.Namespace, runs: list[Run], command: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = Path(args.out)
    records = [run.result for run in runs if run.result is not None]
    for run in runs:  # results written before the harness recorded it
        if run.result is not None and "cache_fill_s" not in run.result:
            fill = cache_fill_seconds(run.directory)
            if fill is not None:
                run.result["cache_fill_s"] = fill
    (out / "runs.json").write_text(json.dumps(records, indent=2) + "\n")
    fields = ["method", "seed", "status", "test_acc", "test_acc_top5", "test_loss", "val_acc_last", "val_acc_best",
              "val_epochs", "wall_s", "cache_fill_s", "finished", "command"]  # fmt: skip
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    method_names = list(dict.fromkeys(run.method.name for run in runs))
    rows = summarize(records, method_names)
    epochs = "" if args.max_epochs is None else f", {args.max_epochs} epoch" + ("s" if args.max_epochs != 1 else "")
    title = args.title or f"{Path(args.data).stem} / {Path(args.model).stem}{epochs}"
    start, end = _span(records) if records else (time.time(), time.time())
    grid = {
        "runs_ok": sum(1 for r in records if r["status"] == "ok"),
        "runs_total": len(runs),
        "span": f"{(end - start) / 60:.1f} min ({time.strftime('%Y-%m-%d %H:%M', time.localtime(start))} to"
        f" {time.strftime('%H:%M', time.localtime(end))})",
        "jobs": args.jobs,
        "threads": args.threads,
        "example_run": shlex.join(runs[0].command) if runs else "",
        "load": _load_summary(out / LOAD_FILE, start, end),
        "code": sorted({str(r["code"]) for r in records if r.get("code")}),
        "note": args.note,
    }
    table = markdown_table(rows, title=title, command=command, info=machine(), grid=grid, compare=args.compare)
    (out / "table.md").write_text(table)
    plot(rows, out / "plot.png", title)
    return records, rows


def _grid_command(own: list[str]) -> list[str]:
    """The harness arguments without those that only change the report (``--report-only``, ``--note``, ``--title``)."""
    shown, skip = [], False
    for arg in own:
        if skip:
            skip = False
        elif arg == "--report-only" or arg.startswith(("--note=", "--title=")):
            continue
        elif arg in ("--note", "--title"):
            skip = True
        else:
            shown.append(arg)
    return shown


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, overrides = split_argv(argv)
    args = build_parser().parse_args(own)
    if args.jobs < 1:
        raise SystemExit(f"reproduce.py: expected --jobs to be >= 1, but got {args.jobs}.")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"reproduce.py: expected distinct --seeds, but got {args.seeds}.")
    for path in (args.data, args.model):
        if not Path(path).is_file():
            raise SystemExit(f"reproduce.py: the config {path!r} does not exist.")
    methods = [parse_method(spec) for spec in args.methods]
    if len({m.name for m in methods}) != len(methods):
        raise SystemExit(f"reproduce.py: expected distinct method names, but got {[m.name for m in methods]}.")
    # The command that runs the grid (a --report-only rebuild reports the grid's command).
    shown = _grid_command(own) + (["--", *overrides] if overrides else [])
    command = shlex.join([Path(sys.executable).name, "benchmarks/reproduce.py", *shown])
    runs = plan(args, methods, overrides)
    if args.dry_run:
        for run in runs:
            state = "done" if run.result is not None else "todo"
            print(f"[{state}] {run.key}: {shlex.join(run.command)}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = sum(run.result is not None for run in runs)
    if not args.report_only:
        print(f"{len(runs)} runs, {skipped} already finished (skipped), {len(runs) - skipped} to run.", flush=True)
        try:
            execute(runs, args.jobs, args.keep_checkpoints, out if args.heatmap_cache else None, out / LOAD_FILE)
        except KeyboardInterrupt:
            for run in runs:
                if run.process is not None and run.process.poll() is None:
                    run.process.terminate()
            raise
    records, rows = report(args, runs, command)
    print((out / "table.md").read_text())
    failed = [r for r in records if r["status"] != "ok"]
    missing = len(runs) - len(records)
    return 1 if failed or (missing and not args.report_only) else 0


if __name__ == "__main__":
    sys.exit(main())
