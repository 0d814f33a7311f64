"""Teacher speed levers, measured side by side: precision, memory format, compile, resolution, the cache.

Each row runs the frozen attention model on the same batch (student-normalised 32 px images,
resized by the model to its input size) and reports images/s, the speed-up over the first row,
and how well its top-k cells agree with the first row's (mean IoU of the chosen cells; 1 = the
same cells). "autograd on" is a teacher that is not frozen and not run under no_grad: what
``torch.no_grad()`` and ``requires_grad_(False)`` save. "heatmap cache" is the per-batch cost
that remains with lightning_acm.cache (lookup + warp of 14x14 maps), the teacher having run
once per dataset.

Examples::

    python benchmarks/bench_teacher.py                          # CPU, EfficientNet-Lite0
    python benchmarks/bench_teacher.py --device cuda --teacher resnet152 --teacher-weights none --compile
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _common, and lightning_acm without installing it
from _common import (  # noqa: E402
    add_teacher_arguments,
    base_parser,
    build_teacher,
    describe_machine,
    make_datamodule,
    markdown_table,
    setup_run,
    time_call,
)
from fidelity import topk_overlap  # noqa: E402

from lightning_acm.cache import HeatmapCache  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "random"])
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (slow to compile on CPU)")
    parser.add_argument("--top-k", type=int, default=6)
    add_teacher_arguments(parser, size=224)
    args = parser.parse_args()
    device = setup_run(args)
    cuda = device.type == "cuda"
    batch_size = args.batch_size or (256 if cuda else 32)
    repeats = args.repeats or (20 if cuda else 3)

    datamodule, data_label = make_datamodule(
        args.data, data_dir=args.data_dir, num_samples=batch_size, batch_size=batch_size, num_workers=0, seed=args.seed
    )
    reference = datamodule.train_reference_dataset()  # type: ignore[attr-defined]
    images = torch.stack([reference[i][0] for i in range(batch_size)]).to(device)
    mean, std = datamodule.mean, datamodule.std  # type: ignore[attr-defined]

    def teacher(**overrides: Any) -> tuple[torch.nn.Module, str]:
        options: dict[str, Any] = dict(
            weights=args.teacher_weights,
            layer=args.teacher_layer,
            input_size=args.teacher_size,
            amp=args.teacher_amp,
            channels_last=args.channels_last,
        )
        options.update(overrides)
        torch.manual_seed(args.seed)  # random-init teachers: the same weights in every row
        return build_teacher(args.teacher, input_mean=mean, input_std=std, device=device, **options)

    amp = "bf16" if not cuda else "fp16"
    base, base_label = teacher()
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [(f"baseline: {base_label}", lambda: base(images))]

    naive, _ = teacher()
    naive.requires_grad_(True)

    def with_autograd() -> torch.Tensor:
        with torch.enable_grad():
            features = naive._features(naive.teacher_input(images))
        return features.mean(1).detach()

    variants.append(("autograd on (not frozen, no no_grad)", with_autograd))
    for label, kwargs in [
        ("channels_last", {"channels_last": True}),
        (f"{amp} autocast", {"amp": amp}),
        (f"{amp} autocast + channels_last", {"amp": amp, "channels_last": True}),
        ("stride-16 layer @ half size", {"layer": "stride16", "input_size": args.teacher_size // 2}),
        (
            f"stride-16 @ half size + {amp} + channels_last",
            {"layer": "stride16", "input_size": args.teacher_size // 2, "amp": amp, "channels_last": True},
        ),
    ]:
        model, full_label = teacher(**kwargs)
        variants.append((f"{label}: {full_label}", lambda model=model: model(images)))
    if args.compile:
        for label, kwargs in [
            ("torch.compile", {}),
            (f"torch.compile + {amp} + channels_last", {"amp": amp, "channels_last": True}),
        ]:
            model, _ = teacher(**kwargs)
            model.compile_features()  # the backbone truncated at the tapped layer, as attention_compile=True does
            variants.append((label, lambda model=model: model(images)))

    cache = HeatmapCache(batch_size, 14, device=device)
    cache.update(torch.arange(batch_size), torch.rand(batch_size, 14, 14))
    geometry = torch.cat(
        [
            torch.arange(batch_size)[:, None].float(),
            torch.zeros(batch_size, 2),
            torch.ones(batch_size, 2),
            (torch.rand(batch_size, 1) < 0.5).float(),
        ],
        1,
    ).to(device)
    variants.append(
        ("heatmap cache: lookup + warp per batch (teacher ran once per dataset)", lambda: cache.warp(geometry, 7))
    )

    expected = base(images)
    rows, first = [], None
    for label, fn in variants:
        seconds = time_call(fn, device, repeats=repeats, warmup=1 if not cuda else 3)
        first = first or seconds
        heat = fn() if not label.startswith("heatmap cache") else None
        agreement = float(topk_overlap(heat.float(), expected, args.top_k).mean()) if heat is not None else None
        rows.append(
            {
                "teacher setting": label,
                "images/s": batch_size / seconds,
                "speed-up": first / seconds,
                f"top-{args.top_k} IoU vs baseline": agreement,
            }
        )

    print(f"# Teacher speed levers\n\n{describe_machine(device)}\ndata: {data_label}, batch {batch_size}\n")
    print(markdown_table(rows))
    if args.teacher_weights == "none":
        print(
            "\nThe teacher has random weights (--teacher-weights none): timing only; the IoU column means little"
            " (fp16 can overflow in a random deep ResNet, giving IoU 0)."
        )


if __name__ == "__main__":
    main()
