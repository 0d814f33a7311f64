"""The LightningCLI: every packaged YAML parses and instantiates (run=False), names resolve, and a tiny fit runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp, RandomMixing
from lightning_acm.cli import CONFIG_DIR, AttentiveCutMixCLI, _packaged_configs, _resolve_config
from lightning_acm.data import FASHION_MNIST_SYSTEM_DIR, FashionMNISTDataModule, _read_idx, _write_idx
from lightning_acm.model import ImageClassifier

CONFIGS = CONFIG_DIR
DATA = sorted((CONFIGS / "data").glob("*.yaml"))
MODELS = sorted((CONFIGS / "model").glob("*.yaml"))
METHODS = sorted((CONFIGS / "method").glob("*.yaml"))
FMNIST = str(CONFIGS / "data" / "fashion_mnist.yaml")
SMALL_MODEL = str(CONFIGS / "model" / "cifar_resnet8.yaml")
BASELINE = str(CONFIGS / "method" / "baseline.yaml")


def cli(*configs: str, extra: tuple[str, ...] = ()) -> AttentiveCutMixCLI:
    args = [arg for config in configs for arg in ("--config", config)]
    return AttentiveCutMixCLI(args=[*args, "--trainer.logger=false", *extra], run=False)


def test_the_paper_grid_is_covered():
    assert {p.stem for p in DATA} >= {"cifar10", "cifar100", "imagenet", "fashion_mnist"}
    paper_models = {f"resnet{d}" for d in (18, 34, 101, 152)} | {f"densenet{d}" for d in (121, 169, 201, 264)}
    paper_models |= {f"efficientnet_b{i}" for i in (0, 1, 6, 7)}
    assert {p.stem for p in MODELS} >= paper_models
    assert {p.stem for p in METHODS} >= {"baseline", "mixup", "cutmix", "attentive_cutmix"}


@pytest.mark.parametrize("data", DATA, ids=lambda p: p.stem)
def test_data_configs_instantiate(data: Path):
    run = cli(str(data), SMALL_MODEL, BASELINE)
    assert run.datamodule.num_classes == run.model.hparams.num_classes
    assert run.model.hparams.in_channels == run.datamodule.dims[0]


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.stem)
def test_model_configs_instantiate(model: Path):
    run = cli(FMNIST, str(model), BASELINE)
    assert isinstance(run.model, ImageClassifier)
    assert run.model.hparams.arch == model.stem
    assert run.model.hparams.num_classes == 10


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_method_configs_instantiate(method: Path):
    run = cli(FMNIST, SMALL_MODEL, str(method))
    mixing = [c for c in run.trainer.callbacks if isinstance(c, MixingCallback)]
    if method.stem == "baseline":
        assert mixing == []
    else:
        assert len(mixing) == 1
        choices = {"timm_recipe": RandomMixing, "cutmix_or_attentive": RandomMixing}
        expected = {"mixup": MixUp, "cutmix": CutMix, **choices}.get(method.stem, AttentiveCutMix)
        assert type(mixing[0]) is expected
    if method.stem == "attentive_cutmix":
        assert mixing[0].teacher.source == "paper" and mixing[0].top_k == 6 and mixing[0].grid_size == (7, 7)
    if method.stem == "timm_recipe":
        assert [(type(m), m.alpha) for m in mixing[0].methods] == [(CutMix, 1.0), (MixUp, 0.8)]
        assert (mixing[0].probabilities, mixing[0].p, mixing[0].label_smoothing) == ((0.5, 0.5), 1.0, 0.1)
    if method.stem == "cutmix_or_attentive":
        assert [type(m) for m in mixing[0].methods] == [CutMix, AttentiveCutMix]
        assert mixing[0].methods[1].teacher.source == "efficientnet_lite0" and mixing[0].probabilities == (0.5, 0.5)


def test_every_packaged_config_is_checked_here_and_the_clone_links_to_them():
    checked = {"demo"} | {f"{p.parent.name}/{p.stem}" for p in (*DATA, *MODELS, *METHODS)}
    assert set(_packaged_configs()) == checked
    assert (Path(__file__).resolve().parents[1] / "configs").resolve() == CONFIG_DIR


@pytest.mark.parametrize("value", ["demo", "demo.yaml", "configs/demo.yaml"])
def test_a_packaged_name_resolves_to_its_file(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # away from the clone, as after a pip install
    assert _resolve_config(value) == str(CONFIG_DIR / "demo.yaml")
    assert _resolve_config("method/cutmix") == str(CONFIG_DIR / "method" / "cutmix.yaml")


def test_files_and_inline_configs_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("seed_everything: 1\n")  # a file wins over the packaged name
    assert _resolve_config("demo") == "demo"
    assert _resolve_config("{seed_everything: 1}") == "{seed_everything: 1}"
    assert _resolve_config("seed_everything: 1") == "seed_everything: 1"


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError, match=r"packaged config \(data/cifar10, .*demo, .*model/resnet34\), but got 'demoo'"
    ):
        _resolve_config("demoo")


@pytest.mark.parametrize("form", ["--config NAME", "--config=NAME", "-c NAME", "-c=NAME"])
def test_the_cli_takes_packaged_names(form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    names = ["data/fashion_mnist", "model/cifar_resnet8.yaml", "configs/method/cutmix.yaml"]
    args = [arg for name in names for arg in form.replace("NAME", name).split()]
    run = AttentiveCutMixCLI(args=[*args, "--trainer.logger=false"], run=False)
    assert isinstance(run.datamodule, FashionMNISTDataModule) and run.model.hparams.arch == "cifar_resnet8"
    assert [type(c) for c in run.trainer.callbacks if isinstance(c, (AttentiveCutMix, CutMix, MixUp))] == [CutMix]


def test_the_cli_refuses_an_unknown_config_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="2"):
        AttentiveCutMixCLI(args=["fit", "--config", "data/fashion_mnist", "--config=demoo"])
    assert "the name of a packaged config (data/cifar10, " in capsys.readouterr().err


def test_demo_config_instantiates():
    run = cli(str(CONFIGS / "demo.yaml"))
    assert isinstance(run.datamodule, FashionMNISTDataModule)
    (mixing,) = [c for c in run.trainer.callbacks if isinstance(c, AttentiveCutMix)]
    assert mixing.heatmap_cache and mixing.teacher.source == "efficientnet_lite0"
    assert any(isinstance(c, ModelCheckpoint) for c in run.trainer.callbacks)


def test_unknown_arch_is_refused_by_the_cli():
    with pytest.raises((ValueError, SystemExit)):
        cli(FMNIST, BASELINE, extra=("--model.arch=resnet15",))


@pytest.fixture
def tiny_fashion_mnist(tmp_path: Path) -> Path:
    """A 300/100-image Fashion-MNIST made from the real files when installed, else random."""
    out = tmp_path / "fmnist"
    out.mkdir()
    system = Path(FASHION_MNIST_SYSTEM_DIR)
    for split, n in (("train", 300), ("t10k", 100)):
        if (system / f"{split}-images-idx3-ubyte.gz").exists():
            images = _read_idx(system / f"{split}-images-idx3-ubyte.gz", 2051)[:n]
            labels = _read_idx(system / f"{split}-labels-idx1-ubyte.gz", 2049)[:n]
        else:
            images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
            labels = torch.arange(n, dtype=torch.uint8) % 10
        _write_idx(out / f"{split}-images-idx3-ubyte", images)
        _write_idx(out / f"{split}-labels-idx1-ubyte", labels)
    return out


@pytest.mark.parametrize("method", ["baseline", "attentive_cutmix_offline_112", "timm_recipe"])
def test_fit_through_the_cli_prints_the_test_accuracy(method: str, tiny_fashion_mnist: Path, tmp_path: Path, caplog):
    with caplog.at_level(logging.INFO):
        AttentiveCutMixCLI(
            args=[
                "fit",
                "--config",
                FMNIST,
                "--config",
                SMALL_MODEL,
                "--config",
                str(CONFIGS / "method" / f"{method}.yaml"),
                "--data.init_args.data_dir",
                str(tiny_fashion_mnist),
                "--data.init_args.system_dir",
                "null",
                "--data.init_args.val_split",
                "50",
                "--data.init_args.batch_size",
                "32",
                "--trainer.max_epochs",
                "1",
                "--trainer.limit_train_batches",
                "2",
                "--trainer.limit_val_batches",
                "1",
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
                "--test_after_fit",
                "true",
                "--seed_everything",
                "0",
            ]  # fmt: skip
        )
    assert "Test top-1 accuracy:" in caplog.text
    assert list((tmp_path / "run").rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("{mode: max-autotune, dynamic: false}", {"mode": "max-autotune", "dynamic": False})],
)
def test_attention_compile_from_the_command_line(value: str, expected: object):
    run = cli(
        FMNIST,
        SMALL_MODEL,
        str(CONFIGS / "method" / "attentive_cutmix_offline.yaml"),
        extra=("--mixing.init_args.teacher", f"{{source: efficientnet_lite0, compile: {value}}}"),
    )
    (mixing,) = [c for c in run.trainer.callbacks if isinstance(c, AttentiveCutMix)]
    assert mixing.teacher.compile == expected
