"""Why is CutMix slower than cached Attentive CutMix in GPU training? ms/step per method + a profile."""

import os
import sys
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import lightning as L
import torch
from _common import build_teacher, make_datamodule

from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixUp
from lightning_acm.model import ImageClassifier

dev = "cuda" if torch.cuda.is_available() else "cpu"
bs, steps, workers = (256, 40, 8) if dev == "cuda" else (16, 6, 0)
data_dir = sys.argv[1]
dm, _ = make_datamodule(
    "auto", num_samples=bs * (steps + 4), batch_size=bs, num_workers=workers, seed=0, data_dir=data_dir
)


class StepTimer(L.Callback):
    def __init__(self, profile_from=None):
        self.times, self.profile_from, self.prof = [], profile_from, None

    def on_train_batch_start(self, trainer, m, batch, i):
        if i == 4:
            torch.cuda.synchronize() if dev == "cuda" else None
            self.t0 = time.perf_counter()
        if self.profile_from is not None and i == self.profile_from:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
            )
            self.prof.__enter__()
        if self.profile_from is not None and i == self.profile_from + 5 and self.prof is not None:
            self.prof.__exit__(None, None, None)

    def on_train_end(self, trainer, m):
        torch.cuda.synchronize() if dev == "cuda" else None
        self.ms = (time.perf_counter() - self.t0) / (trainer.global_step - 4) * 1000


def fit(name, cb, profile_from=None):
    L.seed_everything(0, verbose=False)
    student = ImageClassifier(arch="resnet18", num_classes=10, small_input=True, lr=0.05, lr_scheduler="none")
    timer = StepTimer(profile_from)
    t = L.Trainer(
        accelerator="gpu" if dev == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        callbacks=[timer] + ([cb] if cb else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    t.fit(student, datamodule=dm)
    print(f"{name}: {timer.ms:.2f} ms/step", flush=True)
    return timer


teacher, _ = build_teacher(
    "resnet50" if dev == "cuda" else "efficientnet_lite0",
    weights="none",
    layer=None,
    input_size=224,
    amp=None,
    channels_last=False,
    input_mean=dm.mean,
    input_std=dm.std,
)
mk = {
    "none": lambda: None,
    "cutmix": lambda: CutMix(num_classes=10, seed=0),
    "mixup": lambda: MixUp(num_classes=10, seed=0),
    "cached": lambda: AttentiveCutMix(attention_model=teacher, num_classes=10, seed=0, heatmap_cache=True),
}
fit("warm", None)
for r in range(2 if dev == "cuda" else 0):
    for k in mk:
        fit(f"round {r} {k}", mk[k]())
for k in ("none", "cutmix", "cached"):
    tm = fit(f"profiled {k}", mk[k](), profile_from=10 if dev == "cuda" else 0)
    ka = tm.prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    for ev in ka:
        if any(
            s in ev.key
            for s in (
                "Synchronize",
                "cudaMemcpy",
                "aten::item",
                "aten::_local_scalar_dense",
                "cudaHostAlloc",
                "cudaStreamWait",
            )
        ):
            print(f"  {ev.key}: count {ev.count}, self cpu {ev.self_cpu_time_total / 1000:.2f} ms")
