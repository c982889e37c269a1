"""The ``mednist-gan`` command: parse arguments, then call the library.

    mednist-gan train --config configs/debug.yaml [key=value ...] [--dry-run] [--debug]
    mednist-gan export --checkpoint runs/debug/checkpoints/step_000008 --out exported/
    mednist-gan generate --model runs/debug/export/mednist_gan.ts --num-samples 16 --output-dir outputs
    mednist-gan evaluate --model runs/debug/export/model.pt --real-dir /data/MedNIST/Hand [--baseline seed.pt]
    mednist-gan evaluate --model conditional.pt2 --real-dir /data/MedNIST --class all [--usefulness]
    mednist-gan train-classifier --data-root /data/MedNIST   # the feature extractor behind FMD
    mednist-gan train-encoder --data-root /data/MedNIST      # the self-supervised encoder behind FD-SSL
    mednist-gan sweep configs/sweeps/quality.yaml [key=value ...] [--parallel 4]   # Optuna trials (docs/sweeps.md)
    mednist-gan sweep-report configs/sweeps/quality.yaml   # leaderboard, importances, history, best generator
    mednist-gan config-help                      # every config key with its default and meaning
    mednist-gan cache [--clear]                  # the decoded-image cache: its size, or empty it
    mednist-gan prepare-data SRC DST --size 64   # your own images (PNG, TIFF, DICOM) as a training set

Errors caused by input (config, data, checkpoints, arguments) print one line and exit with 2;
training failures (a non-finite loss, a lost process, a failed save) print one line and exit with 1;
a run (or a sweep worker) stopped by a signal after its checkpoint exits with 3. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import MednistGanError


class _HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, unless it has none (None, off, empty) or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config.schema import DataConfig

    parser = argparse.ArgumentParser(prog="mednist-gan", description="Train and use the MedNIST Hand GAN.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (resumes automatically from the run directory's newest checkpoint)")
    train.add_argument("--config", type=Path, help="YAML config (configs/debug.yaml, configs/bundle.yaml, ...)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=5")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    export = sub.add_parser("export", help="write generator-only files (model.pt, mednist_gan.pt2, mednist_gan.ts, "
                                           "bundle/) from a training checkpoint")
    export.add_argument("--checkpoint", type=Path, required=True,
                        help="a checkpoints/step_* folder, or a run directory (its newest checkpoint)")
    export.add_argument("--out", type=Path, required=True,
                        help="output folder: new, empty, or an earlier export (replaced atomically)")
    export.add_argument("--onnx", action="store_true",
                        help="also write mednist_gan.onnx (needs the onnx extra: pip install 'mednist-gan[onnx]')")

    generate = sub.add_parser("generate", help="write sample PNGs from an exported generator or a checkpoint")
    generate.add_argument("--model", type=Path, default=None,
                          help="mednist_gan.pt2, mednist_gan.ts, model.pt, an export folder, a checkpoint folder or a "
                               "run directory (its newest checkpoint); default: a generator shipped in the package "
                               "(Hand, or the six-class one with --class)")
    generate.add_argument("--latent-size", type=int, default=None,
                          help="latent size of a .pt2/TorchScript generator that does not show it "
                               "(read from the model otherwise)")
    generate.add_argument("--num-samples", type=int, default=16,
                          help="images to write (of each class with --class all)")
    generate.add_argument("--output-dir", type=Path, default=Path("outputs"), help="folder for the PNGs")
    generate.add_argument("--seed", type=int, default=0, help="seed of the latents: the same seed, the same images")
    generate.add_argument("--batch-size", type=int, default=256, help="latents per forward pass")
    generate.add_argument("--grid", type=Path, default=None, help="also write a grid of the first 64 samples here")
    generate.add_argument("--latent", choices=("normal", "uniform"), default="normal",
                          help="latent distribution: normal (how mednist-gan trains) or uniform "
                               "(the seed bundle's inference)")
    generate.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: cuda when available")
    generate.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                          help="a class-conditional generator's class to make (a name from its export.json 'classes'; "
                               "the shipped one: AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT), or 'all': "
                               "--num-samples of each, into <output-dir>/<class>/, the grid a row per class. "
                               "Without --model, Hand comes from the shipped Hand generator, whose hands are closer "
                               "to real ones than the six-class generator's")

    evaluate = sub.add_parser("evaluate", help="score generators against real images: distances in two feature "
                                               "spaces and in pixels (SWD), precision/recall, density/coverage, "
                                               "diversity, memorization, class accuracy")
    evaluate.add_argument("--model", type=Path, action="append", default=[], required=True,
                          help="mednist_gan.pt2, mednist_gan.ts, model.pt, an export folder, a checkpoint folder or a "
                               "run directory, or any .pt2/TorchScript generator: latents (N, L) -> images "
                               "(N, 1, 64, 64) in [0, 1]; repeat to compare several")
    evaluate.add_argument("--baseline", type=Path, action="append", default=[],
                          help="a reference generator (e.g. the seed bundle's model.pt), scored with both latent "
                               "distributions")
    evaluate.add_argument("--real-dir", type=Path, default=None,
                          help="folder of real images (e.g. MedNIST/Hand); default: the package's 200-image sample")
    evaluate.add_argument("--num-samples", type=int, default=None,
                          help="N generated and N real images per comparison (default: min(5000, real images / 2))")
    evaluate.add_argument("--latent", choices=("normal", "uniform", "both"), default="normal",
                          help="latent distribution to sample --model with")
    evaluate.add_argument("--latent-size", type=int, default=None,
                          help="L for a .pt2/TorchScript generator that does not show it "
                               "(read from the model otherwise)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the latents and of the real images drawn")
    evaluate.add_argument("--classifier", type=Path, default=None,
                          help="classifier weights for FMD, KID and class accuracy (default: the shipped one)")
    evaluate.add_argument("--encoder", type=Path, default=None,
                          help="self-supervised encoder weights for FD-SSL, precision/recall, density/coverage and "
                               "memorization (default: the shipped one)")
    evaluate.add_argument("--class", dest="classes", action="append", default=[], metavar="NAME",
                          help="score against this class's real images (--real-dir then holds the class folders); "
                               "repeat, or 'all' for every class folder; a class-conditional generator is sampled "
                               "with its label")
    evaluate.add_argument("--usefulness", type=int, nargs="?", const=1000, default=0, metavar="PER_CLASS",
                          help="with --class all and class-conditional generators: train a classifier on PER_CLASS "
                               "(default 1000) generated images of each class only and report its accuracy on real "
                               "held-out images, beside one trained on as many real images")
    evaluate.add_argument("--blurred", type=float, action="append", default=[], metavar="SIGMA",
                          help="also score the floor's real images blurred with this Gaussian sigma (repeatable): a "
                               "yardstick (the shipped generators' targets, docs/quality.md, use sigma 1.5)")
    evaluate.add_argument("--out", type=Path, default=Path("evaluation.json"), help="where the JSON result goes")

    train_classifier = sub.add_parser("train-classifier", help="train the MedNIST classifier whose features FMD uses")
    train_encoder = sub.add_parser("train-encoder", help="train the self-supervised MedNIST encoder: the second "
                                                         "feature space of the quality metrics (no labels)")
    for extractor, epochs, name in ((train_classifier, 3, "classifier"), (train_encoder, 5, "encoder")):
        extractor.add_argument("--data-root", type=Path, required=True,
                               help="MedNIST folder with the six class folders")
        where = extractor.add_mutually_exclusive_group()
        where.add_argument("--out", type=Path, default=None,
                           help=f"weights file, its card beside it as .json (default: {_default_extractor_out(name)}, "
                                "refused if it exists)")
        where.add_argument("--replace-shipped", action="store_true",
                           help=f"replace the package's shipped {name} (which every score uses) and rewrite its card "
                                "and checksum")
        extractor.add_argument("--epochs", type=int, default=epochs, help="passes over the training images")
        extractor.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the order")
        extractor.add_argument("--threads", type=int, default=2, help="CPU threads (fixed, so the run is reproducible)")
        extractor.add_argument("--limit-per-class", type=int, default=None,
                               help="use only the first N images of each class")

    sw = sub.add_parser("sweep", help="run trials of a search space (configs/sweeps/*.yaml) with Optuna: a worker; "
                                      "start several (slurm/sweep.sbatch) for a parallel sweep")
    sw.add_argument("spec", type=Path, help="search-space file (configs/sweeps/quality.yaml, ...)")
    sw.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for every trial, e.g. data.root=/data/MedNIST")
    sw.add_argument("--parallel", type=int, default=1,
                    help="trials this worker runs side by side (slurm/sweep.sbatch: TRIALS_PER_GPU)")
    sw.add_argument("--worker-id", default=None,
                    help="who claims trials, so that a restarted worker resumes its own (default: the SLURM array "
                         "task or job, else this host's name)")
    sw.add_argument("--sweep-dir", type=Path, default=None, help="the sweep's folder (default: the file's sweep_dir, "
                                                                  "else sweeps/<name>)")
    sw.add_argument("--trial", type=int, default=None,
                    help="run this one claimed trial in this process (what a worker starts for each trial)")
    sw.add_argument("--dry-run", action="store_true", help="check the search space, print it and exit")

    rep = sub.add_parser("sweep-report", help="a sweep's leaderboard, parameter importances, history plot, and "
                                              "the best trial's generator exported")
    rep.add_argument("sweep", type=Path, help="the search-space file, or the sweep's folder (with its optuna.journal)")
    rep.add_argument("overrides", nargs="*", metavar="key=value", help="the overrides the sweep was started with")
    rep.add_argument("--sweep-dir", type=Path, default=None, help="the sweep's folder, when the sweep was run with it")
    rep.add_argument("--out", type=Path, default=None, help="where the report goes (default: <sweep_dir>/report)")
    rep.add_argument("--no-export", action="store_true", help="do not export the best trial's generator")

    sub.add_parser("config-help", help="list every config key with its default and meaning")

    prep = sub.add_parser("prepare-data", help="check a folder of your own images (one folder per class: PNG, JPEG, "
                                               "TIFF, DICOM), report it and write it as square 8-bit PNGs to train on")
    prep.add_argument("src", type=Path, help="the folder of class folders")
    prep.add_argument("dst", type=Path, help="where the prepared set goes: a new or empty folder (then data.root)")
    prep.add_argument("--size", type=int, default=64, help="side of the square images (the model's image_shape)")
    prep.add_argument("--resize", choices=("center-crop", "pad", "stretch"), default="center-crop",
                      help="how images of another shape reach the size")
    prep.add_argument("--interpolation", choices=("area", "bilinear", "bicubic", "nearest"), default="area",
                      help="how pixels are resampled")
    prep.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                      help="map LOW..HIGH to black..white (e.g. -1000 1000 Hounsfield units for CT); default: each "
                           "image from its minimum to its maximum")

    cache = sub.add_parser("cache", help="the decoded-image cache (data.cache_dir): its size, or --clear to empty it")
    cache.add_argument("--dir", type=Path, default=Path(DataConfig.cache_dir), help="the cache folder")
    cache.add_argument("--clear", action="store_true", help="remove its decoded image sets (nothing else there)")

    for p in (parser, train, export, generate, evaluate, train_classifier, train_encoder, sw, rep, prep):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    for p in (parser, *sub.choices.values()):
        p.formatter_class = _HelpWithDefaults
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from .training.run_folder import dry_run

        print(dry_run(cfg), end="")
        return 0
    from .training.stopping import PREEMPTED_EXIT_CODE, Preempted
    from .training.trainer import train

    try:
        train(cfg)
    except Preempted as exc:
        print(f"mednist-gan: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def _export(args: argparse.Namespace) -> int:
    from .generator.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, onnx=args.onnx)
    print(f"exported to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generator.generate import generate, shipped_model
    from .runtime.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # a process of its own: large batches reuse their pages instead of faulting them in
    model, class_name = (args.model, args.class_name) if args.model else shipped_model(args.class_name)
    paths = generate(model, args.num_samples, args.output_dir, seed=args.seed, batch_size=args.batch_size,
                     grid=args.grid, latent=args.latent, device=args.device, latent_size=args.latent_size,
                     class_name=class_name)
    print(f"wrote {len(paths)} PNGs to {args.output_dir}" + (f" and a grid to {args.grid}" if args.grid else ""))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .data import SAMPLE_ROOT
    from .errors import MednistGanError, OutputError
    from .runtime.host_memory import keep_freed_host_memory
    from .files import ensure_writable_folder
    from .generator.generate import check_seed
    from .quality.evaluate import evaluate, format_table, write_json

    if args.num_samples is not None and args.num_samples < 2:
        raise MednistGanError(f"--num-samples {args.num_samples}: expected an integer >= 2")
    check_seed(args.seed)
    real_dir = args.real_dir or (SAMPLE_ROOT if args.classes else SAMPLE_ROOT / "Hand")
    if not real_dir.is_dir():
        raise MednistGanError(f"--real-dir {real_dir}: no such folder")
    if args.out.is_dir():  # before minutes of scoring, not after
        raise OutputError(f"--out {args.out}: is a folder; expected the path of the JSON file to write")
    ensure_writable_folder(args.out.resolve().parent, "--out")
    keep_freed_host_memory()
    latents = ("normal", "uniform") if args.latent == "both" else (args.latent,)
    models = [(str(model), model, latents) for model in args.model]
    models += [(f"baseline {baseline}", baseline, ("normal", "uniform")) for baseline in args.baseline]
    result = evaluate(models, real_dir, args.num_samples, args.seed, args.classifier, latent_size=args.latent_size,
                      encoder=args.encoder, classes=args.classes or None, usefulness=args.usefulness, blur=args.blurred)
    print(format_table(result))
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0


def _default_extractor_out(name: str) -> Path:
    """Where ``train-classifier`` / ``train-encoder`` write without ``--out``: a run folder of their own."""
    return Path("runs") / name / f"{name}.pt"


def _train_feature_extractor(args: argparse.Namespace) -> int:
    """``train-classifier`` and ``train-encoder``: the two feature extractors of the quality metrics. They write
    to a run folder unless told to replace the shipped one, which every score depends on."""
    import shlex

    from .errors import OutputError
    from .files import ensure_writable_folder
    from .quality.classifier import check_class_folders

    if args.command == "train-classifier":
        from .quality.classifier import WEIGHTS_FILE, train_classifier as train_extractor

        def summary(r: dict) -> str:
            return f"held-out accuracy {r['test_accuracy']:.4%} on {r['test_images']} images"
    else:
        from .quality.encoder import WEIGHTS_FILE, train_encoder as train_extractor

        def summary(r: dict) -> str:
            return f"held-out view retrieval {r['view_retrieval_top1']:.1%} on 1,000 images"
    name = args.command.removeprefix("train-")
    if args.replace_shipped:
        out = WEIGHTS_FILE
    elif args.out is None:
        out = _default_extractor_out(name)
        if out.exists():
            raise OutputError(f"{out} exists (an earlier {args.command}); pass --out to name another file, or that "
                              "one to replace it")
    elif args.out.resolve() == WEIGHTS_FILE.resolve():
        raise MednistGanError(f"--out {args.out}: is the shipped {name}, which every score uses; pass "
                              "--replace-shipped to replace it (its card and checksum are rewritten with it)")
    else:
        out = args.out
    check_class_folders(args.data_root)  # before the run folder is made
    ensure_writable_folder(out.resolve().parent, "--out")
    command = "mednist-gan " + " ".join(shlex.quote(a) for a in args.argv)
    card = train_extractor(args.data_root, out, epochs=args.epochs, seed=args.seed, threads=args.threads,
                           limit_per_class=args.limit_per_class, command=command)
    print(f"{summary(card['results'])}; wrote {out} (sha256 {card['sha256'][:12]})")
    return 0


def _require_extra(module: str, extra: str, command: str) -> None:
    """A command that needs an optional extra says so in one line when it is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MednistGanError(f"mednist-gan {command} needs {module}, which is not installed: "
                              f'pip install "mednist-gan[{extra}]"')


def _sweep(args: argparse.Namespace) -> int:
    _require_extra("optuna", "sweep", "sweep")
    from .sweep.spec import load_sweep
    from .sweep.trial import run_trial
    from .sweep.worker import run_worker

    spec = load_sweep(args.spec, args.overrides, args.sweep_dir)
    if args.dry_run:
        print(f"sweep {spec.name}: {spec.trials} trials in {spec.sweep_dir}, storage {spec.storage}, objective "
              f"{spec.metric} ({spec.direction}), sampler {spec.sampler['kind']}, pruner {spec.pruner['kind']}")
        for p in spec.params:
            print(f"  {p.key}: {p.describe()}")
        return 0
    if args.trial is None:
        return run_worker(spec, args.parallel, args.worker_id, debug=args.debug)
    from .training.stopping import PREEMPTED_EXIT_CODE, Preempted

    try:
        return run_trial(spec, args.trial)
    except Preempted as exc:
        print(f"mednist-gan: trial {args.trial} {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


def _sweep_report(args: argparse.Namespace) -> int:
    _require_extra("optuna", "sweep", "sweep-report")
    from .sweep.report import sweep_report

    sweep_report(args.sweep, args.overrides, args.sweep_dir, args.out, export=not args.no_export)
    return 0


def _config_help(args: argparse.Namespace) -> int:
    from .config import describe_fields

    print(describe_fields())
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from .prepare import format_report, prepare_data

    report = prepare_data(args.src, args.dst, args.size, args.resize, args.interpolation,
                          tuple(args.window) if args.window else None)
    print(format_report(report, args.dst))
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .data import cache_entries

    entries = cache_entries(str(args.dir))
    size = sum(p.stat().st_size for p in entries) / 2**20
    if args.clear:
        for entry in entries:
            entry.unlink()
        print(f"{args.dir}: removed {len(entries)} decoded image set(s), {size:.1f} MiB")
    else:
        print(f"{args.dir}: {len(entries)} decoded image set(s), {size:.1f} MiB (remove them with --clear; each "
              "is decoded again when next needed)")
    return 0


COMMANDS = {"train": _train, "export": _export, "generate": _generate, "evaluate": _evaluate,
            "train-classifier": _train_feature_extractor, "train-encoder": _train_feature_extractor, "sweep": _sweep,
            "sweep-report": _sweep_report, "config-help": _config_help, "cache": _cache,
            "prepare-data": _prepare_data}


def _one_line_warnings() -> None:
    """The toolkit's own warnings (e.g. a renamed config key) print as one line, like its errors."""
    import warnings

    from .config import ConfigWarning

    default = warnings.showwarning
    if getattr(default, "one_line", False):  # main() called again in this process
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ConfigWarning):
            print(f"mednist-gan: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    show.one_line = True
    warnings.showwarning = show


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _one_line_warnings()
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except MednistGanError as exc:
        if args.debug:
            raise
        print(f"mednist-gan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the output went to a pager or `head` that stopped reading: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 0
    except OSError as exc:
        if args.debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk where no write path expected one: still one line (the write paths keep what was there)
        print(f"mednist-gan: error: {exc.filename or 'a file'}: cannot be written ({exc.strerror})", file=sys.stderr)
        return MednistGanError.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("mednist-gan: interrupted", file=sys.stderr)
        from .training.stopping import INTERRUPTED_EXIT_CODE

        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    raise SystemExit(main())
