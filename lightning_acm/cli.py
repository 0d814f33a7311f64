"""The ``lightning-acm`` command line: a LightningCLI with a mixing method as a first-class key, e.g.
``lightning-acm fit --config data/cifar10 --config model/resnet18 --config method/attentive_cutmix``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_acm.callbacks import MixingCallback
from lightning_acm.data import VisionDataModule
from lightning_acm.model import ImageClassifier

__all__ = ["CONFIG_DIR", "AttentiveCutMixCLI", "main"]

#: The YAML configs shipped inside the package (``configs/`` in a clone links here).
CONFIG_DIR = Path(__file__).resolve().with_name("configs")


def _packaged_configs() -> list[str]:
    """The packaged configs' paths in :data:`CONFIG_DIR`, without ``.yaml``."""
    return sorted(path.relative_to(CONFIG_DIR).with_suffix("").as_posix() for path in CONFIG_DIR.rglob("*.yaml"))


def _resolve_config(value: str) -> str:
    """The file a ``--config`` value stands for: a file or inline YAML (holding ``:`` or ``{``) as it is, else the
    packaged config of that name (with or without ``.yaml`` and a leading ``configs/``)."""
    if Path(value).is_file() or any(char in value for char in ":{"):
        return value
    name = value.removeprefix("configs/").removesuffix(".yaml")
    names = _packaged_configs()
    if name in names:
        return str(CONFIG_DIR / f"{name}.yaml")
    raise ValueError(
        f"Expected `--config` to be a YAML file or the name of a packaged config ({', '.join(names)}),"
        f" but got {value!r}, which is neither."
    )


def _resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with the value of each ``--config``/``-c`` (``--config X`` or ``--config=X``) resolved."""
    resolved: list[str] = []
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if sep and flag in ("--config", "-c"):
            arg = f"{flag}={_resolve_config(value)}"
        elif i > 0 and args[i - 1] in ("--config", "-c"):
            arg = _resolve_config(arg)
        resolved.append(arg)
    return resolved


class AttentiveCutMixCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` on any :class:`VisionDataModule`, with a ``mixing`` method.

    The ``mixing`` key holds a :class:`~lightning_acm.callbacks.MixingCallback` added to the Trainer's callbacks
    (``null``: the baseline); ``data.num_classes`` and the input channels are linked to the model. A ``--config``
    value is a file, inline YAML, or the name of a packaged config in :data:`CONFIG_DIR` (``demo``,
    ``method/cutmix``), so that the packaged configs work from any directory.

    Example::

        >>> cli = AttentiveCutMixCLI(args=["--data=FashionMNISTDataModule", "--model.arch=cifar_resnet8"], run=False)
        >>> type(cli.datamodule).__name__, cli.model.hparams.num_classes
        ('FashionMNISTDataModule', 10)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("datamodule_class", VisionDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        try:
            resolved = _resolve_config_args(list(sys.argv[1:] if args is None else args))
        except ValueError as err:
            parser.error(str(err))
        if args is None:  # parsed here: given any args, super() warns that sys.argv holds arguments too
            self.config = parser.parse_args(resolved)
        else:
            super().parse_arguments(parser, resolved)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MixingCallback, "mixing", subclass_mode=True, required=False)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.dims", "model.in_channels", compute_fn=lambda dims: dims[0], apply_on="instantiate")
        help_text = "After fit, test the best checkpoint (or the last weights) and print the test top-1."
        parser.add_argument("--test_after_fit", type=bool, default=False, help=help_text)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The baseline has `mixing: null`; LightningCLI would pass that None on as a callback.
        keys = self._parser(self.subcommand).callback_keys
        extra: list[Callback] = [cb for cb in (self._get(self.config_init, key) for key in keys) if cb is not None]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        return self._instantiate_trainer(trainer_config, extra)

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", default=False):
            return
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        accuracy: Optional[float] = results[0].get("test/acc") if results else None
        if accuracy is not None:
            source = f"checkpoint {best}" if best else "the final weights"
            rank_zero_info(f"\nTest top-1 accuracy: {100 * accuracy:.2f}% ({source})")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-acm`` and ``python -m lightning_acm``."""
    AttentiveCutMixCLI(args=args)
