"""The Trainer most tests fit with: on the CPU, one epoch, nothing logged, saved or printed."""

from __future__ import annotations

from typing import Any

import lightning as L

QUIET = dict(
    accelerator="cpu",
    max_epochs=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def quiet_trainer(**overrides: Any) -> L.Trainer:
    """``L.Trainer`` with :data:`QUIET`'s settings; ``overrides`` win (``quiet_trainer(callbacks=[CutMix()])``)."""
    return L.Trainer(**{**QUIET, **overrides})
