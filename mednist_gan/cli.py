"""The ``mednist-gan`` command: parse arguments, then call the library.

    mednist-gan train --config configs/debug.yaml [key=value ...] [--dry-run] [--debug]
    mednist-gan export --checkpoint runs/debug/checkpoints/step_000008 --out exported/
    mednist-gan generate --model runs/debug/export/mednist_gan.ts --num-samples 16 --output-dir outputs
    mednist-gan config-help                      # every config key with its default and meaning

Errors caused by input (config, data, checkpoints, arguments) print one line and exit with 2;
training failures (a non-finite loss, a lost process, a failed save) print one line and exit with 1;
a run stopped by a signal after its checkpoint exits with 3. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import MednistGanError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mednist-gan", description="Train and use the MedNIST Hand GAN.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (resumes automatically from the run directory's newest checkpoint)")
    train.add_argument("--config", type=Path, help="YAML config (configs/debug.yaml, configs/bundle.yaml, ...)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=5")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    export = sub.add_parser("export", help="write generator-only files from a training checkpoint")
    export.add_argument("--checkpoint", type=Path, required=True, help="a checkpoints/step_* folder")
    export.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    export.add_argument("--onnx", action="store_true", help="also write mednist_gan.onnx (needs onnx)")

    gen = sub.add_parser("generate", help="write sample PNGs from an exported generator or a checkpoint")
    gen.add_argument("--model", type=Path, required=True, help="mednist_gan.ts, model.pt, or a checkpoint folder")
    gen.add_argument("--num-samples", type=int, default=16)
    gen.add_argument("--output-dir", type=Path, default=Path("outputs"))
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=256)
    gen.add_argument("--grid", type=Path, default=None, help="also write a grid of the first 64 samples here")
    gen.add_argument("--latent", choices=("normal", "uniform"), default="normal",
                     help="latent distribution: normal (how mednist-gan trains) or uniform (the seed bundle's inference)")
    gen.add_argument("--device", default=None, help="cpu or cuda; default: cuda when available")

    sub.add_parser("config-help", help="list every config key with its default and meaning")

    for p in (parser, train, export, gen):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    from .trainer import PREEMPTED_EXIT_CODE, Preempted, train

    try:
        train(cfg)
    except Preempted as exc:
        print(f"mednist-gan: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, onnx=args.onnx)
    print(f"exported to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    paths = generate(args.model, args.num_samples, args.output_dir, seed=args.seed, batch_size=args.batch_size,
                     grid=args.grid, latent=args.latent, device=args.device)
    print(f"wrote {len(paths)} PNGs to {args.output_dir}" + (f" and a grid to {args.grid}" if args.grid else ""))
    return 0


def _config_help(args: argparse.Namespace) -> int:
    from .config import describe_fields

    print(describe_fields())
    return 0


COMMANDS = {"train": _train, "export": _export, "generate": _generate, "config-help": _config_help}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MednistGanError as exc:
        if args.debug:
            raise
        print(f"mednist-gan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("mednist-gan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
