"""The ``lightning-acm`` command line: a LightningCLI with a mixing method as a first-class key.

Every experiment is ``fit`` with three composable configs (data, model, method)::

    lightning-acm fit --config configs/data/cifar10.yaml --config configs/model/resnet18.yaml \\
        --config configs/method/attentive_cutmix.yaml

The ``mixing`` key holds one of :class:`~lightning_acm.callbacks.AttentiveCutMix`,
:class:`~lightning_acm.callbacks.CutMix` or :class:`~lightning_acm.callbacks.MixUp` (or ``null``:
the baseline); it is added to the Trainer's callbacks. ``data.num_classes`` and the number of
input channels are linked to the model, and the mixing callback takes ``num_classes`` and the
normalisation that its attention model must undo from the datamodule (``datamodule.mean``/``std``).
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_acm.callbacks import MixingCallback
from lightning_acm.data import VisionDataModule
from lightning_acm.model import ImageClassifier

__all__ = ["AttentiveCutMixCLI", "main"]


class AttentiveCutMixCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` on any :class:`VisionDataModule`, with a ``mixing`` method.

    Example::

        >>> cli = AttentiveCutMixCLI(args=["--data=FashionMNISTDataModule", "--print_config"], run=False)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("datamodule_class", VisionDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MixingCallback, "mixing", subclass_mode=True, required=False)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.dims", "model.in_channels", compute_fn=lambda dims: dims[0], apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, test the best checkpoint (or the last weights) and print the test top-1.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The baseline has `mixing: null`; LightningCLI would pass that None on as a callback.
        keys = self._parser(self.subcommand).callback_keys
        extra: list[Callback] = [cb for cb in (self._get(self.config_init, key) for key in keys) if cb is not None]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, extra)

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", default=False):
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        accuracy: Optional[float] = results[0].get("test/acc") if results else None
        if accuracy is not None:
            source = f"checkpoint {best}" if best else "the final weights"
            rank_zero_info(f"\nTest top-1 accuracy: {100 * accuracy:.2f}% ({source})")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-acm`` and ``python -m lightning_acm``."""
    AttentiveCutMixCLI(args=args)
