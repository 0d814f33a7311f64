"""A real 2-process DDP fit on CPU (gloo) with each mixing callback; run by tests/test_ddp.py.

Usage: ``python ddp_mix.py OUT_DIR [SEED]``. Lightning's subprocess launcher re-executes this
script for rank 1, so everything runs under ``if __name__ == "__main__"``. Each rank writes
``OUT_DIR/rank{r}.pt``: per method, the mixing of every step (permutation, lam, pasted pixels
per sample), how often the attention model was built, and what the DDP wrapper holds. Rank 0's
checkpoints go to ``OUT_DIR/{method}/``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp, RandomMixing
from lightning_acm.loss import SoftTargetLossMixin

NUM_CLASSES, SIZE, BATCH, STEPS, WORLD = 4, 28, 4, 4, 2


class Net(SoftTargetLossMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, NUM_CLASSES))
        self.seen_mixed: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen_mixed.append(batch[1].ndim == 2)
        return self.soft_target_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountingAttentiveCutMix(AttentiveCutMix):
    builds = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        before = self.attention_model
        super().setup(trainer, pl_module, stage)
        type(self).builds += self.attention_model is not before


class Record(L.Callback):
    """Reads the mixing callback's ``last_mix`` right after it mixed the batch (it runs first)."""

    def __init__(self, mixing: MixingCallback) -> None:
        self.mixing = mixing
        self.steps: list[dict[str, Any]] = []
        self.wrapper: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # During fit the strategy holds the DDP wrapper (teardown unwraps it again).
        wrapped = trainer.strategy.model
        self.wrapper["type"] = type(wrapped).__name__
        attention = getattr(self.mixing, "attention_model", None)
        if attention is not None:
            inside = {id(m) for m in wrapped.modules()}
            params = {id(p) for p in wrapped.parameters()}
            self.wrapper["teacher_inside"] = id(attention) in inside or any(
                id(p) in params for p in attention.parameters()
            )
            self.wrapper["teacher_in_lightning_module"] = any(m is attention for m in pl_module.modules())
            self.wrapper["teacher_device"] = str(next(attention.parameters()).device)
            self.wrapper["root_device"] = str(trainer.strategy.root_device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        mix = self.mixing.last_mix
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "batch_idx": batch_idx,
                "mixed": mix is not None,
                "permutation": None if mix is None else mix.permutation.cpu(),
                "lam": None if mix is None else mix.lam.cpu(),
                "mask_sums": None if mix is None or mix.mask is None else mix.mask.flatten(1).sum(1).cpu(),
                "image_sum": float(batch[0].double().sum()),
            }
        )


def teacher() -> nn.Module:
    conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
    nn.init.constant_(conv.weight, 1.0 / 48)
    return AttentionModel(nn.Sequential(conv, nn.ReLU()), "1", input_size=SIZE, grid_size=7)


def make_callback(method: str, seed: int) -> MixingCallback:
    if method == "attentive_cutmix":
        return CountingAttentiveCutMix(teacher=Teacher(module=teacher()), top_k=6, seed=seed)
    if method == "cutmix":
        return CutMix(alpha=1.0, seed=seed)
    if method == "random_mixing":
        return RandomMixing([CutMix(alpha=1.0), MixUp(alpha=0.4)], seed=seed)
    return MixUp(alpha=0.4, seed=seed)


def run(method: str, seed: int, out_dir: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(WORLD * BATCH * STEPS, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(len(images)) % NUM_CLASSES
    data = DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=False)
    mixing = make_callback(method, seed)
    record = Record(mixing)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=WORLD,
        max_epochs=1,
        callbacks=[mixing, record],
        default_root_dir=os.path.join(out_dir, method),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Net()
    trainer.fit(model, train_dataloaders=data)
    return {
        "steps": record.steps,
        "training_step_saw_soft_targets": model.seen_mixed,
        "wrapper": record.wrapper,
        "checkpoint": trainer.checkpoint_callback.best_model_path if trainer.is_global_zero else None,
        "callback_state": mixing.state_dict(),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("mix/")},
        "builds": CountingAttentiveCutMix.builds if isinstance(mixing, AttentiveCutMix) else None,
    }


def main() -> None:
    out_dir = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1234
    os.makedirs(out_dir, exist_ok=True)
    results = {
        method: run(method, seed, out_dir) for method in ("attentive_cutmix", "cutmix", "mixup", "random_mixing")
    }
    results["rank"] = dist.get_rank()
    results["world_size"] = dist.get_world_size()
    results["backend"] = dist.get_backend()
    torch.save(results, os.path.join(out_dir, f"rank{results['rank']}.pt"))


if __name__ == "__main__":
    main()
