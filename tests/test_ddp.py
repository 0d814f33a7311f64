"""A real 2-process DDP fit on CPU (gloo) with every mixing callback (tests/scripts/ddp_mix.py).

Two launches of the script with the same seed run side by side; each writes what every rank
mixed at every step. Ranks must mix differently, and the second launch must reproduce the first
bit for bit. The attention model must be built once per rank, stay outside the DDP wrapper and
add nothing to the checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_acm.callbacks import batch_generator
from lightning_acm.functional import pairing_permutation

SCRIPT = Path(__file__).parent / "scripts" / "ddp_mix.py"
METHODS = ("attentive_cutmix", "cutmix", "mixup", "random_mixing")
STEPS, BATCH = 4, 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
    ),
]


def _env() -> dict[str, str]:
    # A clean launch: no distributed variables inherited from the test runner, one thread per rank.
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "LOCAL_RANK",
            "NODE_RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "GLOBAL_RANK",
            "RANK",
            "PL_GLOBAL_SEED",
        }
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )  # this checkout
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[int, dict[str, Any]]]:
    """Two launches with the same seed, in parallel; ``runs[launch][rank]`` is what that rank wrote."""
    dirs = [tmp_path_factory.mktemp(f"ddp{i}") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(d), "1234"],
            env=_env(),
            cwd=str(d),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for d in dirs
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    return [{r: torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(2)} for d in dirs]


def _mixes(result: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (s["epoch"], s["batch_idx"], s["mixed"], s["permutation"], s["lam"], s["mask_sums"], s["image_sum"])
        for s in result["steps"]
    ]


def _same(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    def eq(x: Any, y: Any) -> bool:
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    return len(a) == len(b) and all(
        eq(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)
    )


def test_two_gloo_processes_ran(runs):
    for launch in runs:
        for rank, result in launch.items():
            assert (result["rank"], result["world_size"], result["backend"]) == (rank, 2, "gloo")


@pytest.mark.parametrize("method", METHODS)
def test_every_rank_mixes_every_step(runs, method):
    for result in runs[0].values():
        steps = result[method]["steps"]
        assert [s["batch_idx"] for s in steps] == list(range(STEPS))
        assert all(s["mixed"] for s in steps)
        assert all(s["permutation"].shape == (BATCH,) for s in steps)
        assert result[method]["training_step_saw_soft_targets"] == [True] * STEPS
        assert result[method]["callback_state"] == {"seed": 1234, "batches_seen": STEPS, "batches_mixed": STEPS}


@pytest.mark.parametrize("method", METHODS)
def test_ranks_mix_differently(runs, method):
    rank0, rank1 = (runs[0][r][method]["steps"] for r in (0, 1))
    # Different generators per rank: pairings differ, and so does lam where it is drawn
    # (Attentive CutMix pastes 6 of 49 cells on every rank).
    assert any(not torch.equal(a["permutation"], b["permutation"]) for a, b in zip(rank0, rank1, strict=True))
    if method != "attentive_cutmix":
        assert all(not torch.equal(a["lam"], b["lam"]) for a, b in zip(rank0, rank1, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_each_rank_is_seeded_from_seed_rank_epoch_and_batch(runs, method):
    for rank, result in runs[0].items():
        for step in result[method]["steps"]:
            generator = batch_generator(1234, rank, step["epoch"], step["batch_idx"])
            generator.random()  # the draw that decides whether the batch is mixed
            if method == "random_mixing":
                generator.choice(2, p=(0.5, 0.5))  # the pick of CutMix or Mixup
            assert torch.equal(step["permutation"], pairing_permutation(BATCH, generator=generator))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_reproduces_every_rank(runs, method):
    for rank in (0, 1):
        assert _same(_mixes(runs[0][rank][method]), _mixes(runs[1][rank][method])), f"rank {rank} differs"


@pytest.mark.parametrize("method", METHODS)
def test_logged_metrics_are_means_over_both_ranks(runs, method):
    results = [runs[0][rank][method] for rank in (0, 1)]
    lam = torch.cat([step["lam"] for result in results for step in result["steps"] if step["lam"] is not None])
    assert lam.numel() == 2 * STEPS * BATCH
    for result in results:  # every rank logs the global values
        metrics = result["metrics"]
        assert metrics["mix/mixed"] == 1.0
        assert metrics["mix/lam"] == pytest.approx(float(lam.mean()), rel=1e-6)
        assert ("mix/pasted_attention" in metrics) == (method != "cutmix")
        if method == "random_mixing":
            shares = metrics["mix/picked/cutmix"], metrics["mix/picked/mixup"]
            assert 0 < shares[0] < 1 and sum(shares) == pytest.approx(1.0)
    assert results[0]["metrics"] == results[1]["metrics"]


def test_attention_model_is_built_once_per_rank_and_not_wrapped_by_ddp(runs):
    for result in runs[0].values():
        acm = result["attentive_cutmix"]
        assert acm["builds"] == 1
        wrapper = acm["wrapper"]
        assert wrapper["type"] == "DistributedDataParallel"
        assert wrapper["teacher_inside"] is False
        assert wrapper["teacher_in_lightning_module"] is False
        assert wrapper["teacher_device"] == wrapper["root_device"] == "cpu"


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_holds_no_teacher_and_only_the_small_callback_state(runs, method):
    path = runs[0][0][method]["checkpoint"]
    assert path and runs[0][1][method]["checkpoint"] is None  # rank 0 writes
    checkpoint = torch.load(path, weights_only=False)
    assert sorted(checkpoint["state_dict"]) == ["net.1.bias", "net.1.weight"]
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "Mix" in k]
    assert state == {"seed": 1234, "batches_seen": STEPS, "batches_mixed": STEPS}


SPAWN_SCRIPT = """
import sys
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_acm.callbacks import CutMix, MixUp


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        assert targets.ndim == 2, "the mixing callback did not reach training_step"
        return torch.sum(-targets * self.net(images).log_softmax(1), 1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Report(L.Callback):
    def __init__(self, mixing):
        self.mixing = mixing

    def on_train_end(self, trainer, pl_module):
        print(f"rank {trainer.global_rank} mixed {self.mixing.batches_mixed} batches", flush=True)


if __name__ == "__main__":
    images, labels = torch.rand(16, 3, 8, 8), torch.arange(16) % 4
    for mixing in (CutMix(seed=0, num_classes=4), MixUp(seed=0, num_classes=4)):
        trainer = L.Trainer(
            accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=2, callbacks=[mixing, Report(mixing)],
            default_root_dir=sys.argv[1], logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Net(), train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=4))
"""


def test_ddp_spawn_fit_with_the_mixing_callbacks(tmp_path):
    # The callbacks hold no torch.Generator (which cannot cross a spawn under torch's default
    # sharing strategy), so they are pickled to both processes.
    script = tmp_path / "spawn_fit.py"
    script.write_text(SPAWN_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=_env(),
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    for rank in (0, 1):
        assert proc.stdout.count(f"rank {rank} mixed 2 batches") == 2, proc.stdout[-4000:]
