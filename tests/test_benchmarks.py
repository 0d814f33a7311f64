"""benchmarks/: the timing helpers of _common and a smoke run of the mixing-op benchmark (tiny sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import median_ratio, time_interleaved, time_rounds  # noqa: E402


def run_benchmark(script: str, *arguments: str) -> list[str]:
    """The printed lines of ``benchmarks/<script> <arguments>``, which must exit with 0."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines()


def test_time_rounds_calls_each_function_warmup_plus_repeats_times_block_and_returns_one_time_per_round():
    calls = {"a": 0, "b": 0}

    def count(name):
        def fn():
            calls[name] += 1

        return fn

    rounds = time_rounds([count("a"), count("b")], torch.device("cpu"), repeats=7, block=3, warmup=2)
    assert calls == {"a": 2 + 7 * 3, "b": 2 + 7 * 3}
    assert [len(times) for times in rounds] == [7, 7]
    assert all(t >= 0 for times in rounds for t in times)


def test_time_rounds_shuffles_the_order_of_the_functions_between_rounds():
    order = []
    fns = [lambda i=i: order.append(i) for i in range(4)]
    time_rounds(fns, torch.device("cpu"), repeats=20, block=1, warmup=0)
    rounds = [tuple(order[r * 4 : (r + 1) * 4]) for r in range(20)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)  # every function once per round
    assert len(set(rounds)) > 1  # not always the same order
    assert len({r[0] for r in rounds}) > 1  # not always the same function first


def test_median_ratio_compares_round_by_round():
    # The machine drifts over the rounds and the op is 2x the reference in every round but one:
    # the within-round ratio is 2, the ratio of the medians (20 / 2) is not.
    reference = [1.0, 2.0, 10.0]
    times = [2.0, 20.0, 20.0]
    assert median_ratio(times, reference) == pytest.approx(2.0)
    assert median_ratio([1.0, 3.0, 2.0], [1.0, 1.0, 1.0]) == pytest.approx(2.0)


def test_time_interleaved_is_the_median_of_the_rounds():
    medians = time_interleaved([lambda: None], torch.device("cpu"), repeats=5, block=2)
    assert len(medians) == 1 and medians[0] >= 0


def test_bench_mixing_op_runs_and_prints_every_op_with_torchvision_as_the_reference():
    lines = run_benchmark(
        "bench_mixing_op.py",
        "--shapes",
        "4x3x28x28,2x3x32x32",
        "--repeats",
        "2",
        "--block",
        "1",
        "--min-seconds",
        "0",
        "--cache-grid",
        "14",
    )
    rows = [line.split("|") for line in lines if line.startswith(("| 4x3x28x28", "| 2x3x32x32"))]
    assert len(rows) == 2 * 7
    reference_rows = [row for row in rows if row[2].strip() == "torchvision v2.CutMix"]
    assert len(reference_rows) == 2 and all(row[5].strip() == "1" for row in reference_rows)
    assert any("Attentive CutMix (heatmaps given)" in row[2] for row in rows)


# The other benchmarks at toy sizes (random data, a random-weight teacher at the smallest size its
# layer allows): each runs end to end and prints every row of its table.
SMOKE_RUNS = {
    "bench_training.py": (
        [
            "--data",
            "random",
            "--num-samples",
            "48",
            "--batch-size",
            "8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--teacher-weights",
            "none",
            "--teacher-size",
            "112",
        ],
        ["| no mixing |", "| CutMix |", "| Attentive CutMix (teacher every step) |", "| Attentive CutMix (cached"],
    ),
    "bench_teacher.py": (
        ["--data", "random", "--batch-size", "2", "--repeats", "1", "--teacher-weights", "none"],
        ["| baseline:", "| channels_last:", "| bf16 autocast:", "| stride-16 layer @ half size:", "| heatmap cache:"],
    ),
    "bench_cache.py": (
        ["--data", "random", "--num-samples", "16", "--batch-size", "8", "--teacher-weights", "none"],
        ["| crop | cache 7x7", "| resized-crop | cache 7x7", "| crop | chance", "| resized-crop | chance"],
    ),
    "bench_reference_port.py": (
        [
            "--num-samples",
            "8",
            "--batch-size",
            "4",
            "--teacher-weights",
            "none",
            "--teacher-size",
            "112",
            "--teacher-layer",
            "stride16",
        ],
        [
            "| reference-port style:",
            "| ours: AttentiveCutMix callback, teacher on the batch |",
            "| ours: AttentiveCutMix callback, heatmap cache",
        ],
    ),
}


@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_at_toy_size_and_prints_every_row(script):
    arguments, row_starts = SMOKE_RUNS[script]
    lines = run_benchmark(script, *arguments)
    for start in row_starts:
        assert any(line.startswith(start) for line in lines), f"{script}: no row starting with {start!r}\n" + "\n".join(
            lines
        )
