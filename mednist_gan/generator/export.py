"""Generator-only exports: bundle-compatible ``model.pt``, a standalone ``torch.export`` program (``.pt2``) and
TorchScript, optional ONNX, a MONAI bundle folder.

Everything here runs on the main process only and needs nothing but the generator's weights and
its model config; the discriminator and optimizer state never leave the checkpoint.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import shutil
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

import torch

from .. import __version__
from ..config import ModelConfig
from ..errors import CheckpointError, output_error
from ..files import (PROVENANCE_FILE, check_replaceable, fsync_tree, recover_folder, replace_folder, sha256_file,
                    staging_folder)
from .loader import EXPORTED_PROGRAM_FILE, MODEL_FILE, TORCHSCRIPT_FILE, open_generator

ONNX_FILE = "mednist_gan.onnx"
BUNDLE_DIR = "bundle"
LATENT_DISTRIBUTION = "standard normal: torch.randn(N, latent_size)"


def generator_state_dict(generator: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """A flat, contiguous fp32 CPU state_dict with exactly the seed bundle's keys."""
    return OrderedDict((k, v.detach().to("cpu", torch.float32).contiguous()) for k, v in generator.state_dict().items())


class _Standalone(torch.nn.Module):
    """Latents (N, latent) -> images (N, 1, H, W) in [0, 1]; the sigmoid is inside the generator."""

    def __init__(self, generator: torch.nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.generator(latents)


class _ConditionalStandalone(torch.nn.Module):
    """Latents (N, latent) and class labels (N,) int64 -> images (N, 1, H, W) in [0, 1]."""

    def __init__(self, generator: torch.nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.generator(latents, labels)


def _conditional(generator: torch.nn.Module) -> bool:
    return bool(getattr(generator, "num_classes", 0))


def _inference_module(generator: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy for export: eval mode, no parameter requires grad (so ``net(z)`` builds no autograd graph).

    A copy, because the trainer hands over its live generator (or EMA) and keeps training it.
    """
    wrapper = _ConditionalStandalone if _conditional(generator) else _Standalone
    return copy.deepcopy(wrapper(generator)).to("cpu").eval().requires_grad_(False)


def _example_inputs(generator: torch.nn.Module, latent_size: int) -> tuple[tuple[torch.Tensor, ...], tuple[dict, ...]]:
    """Example inputs of the exported function (a batch of 2) and their dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1)
    if _conditional(generator):
        return (torch.randn(2, latent_size), torch.zeros(2, dtype=torch.long)), ({0: batch}, {0: batch})
    return (torch.randn(2, latent_size),), ({0: batch},)


def write_torchscript(generator: torch.nn.Module, f: Union[Path, BinaryIO]) -> None:
    torch.jit.save(torch.jit.script(_inference_module(generator)), f if isinstance(f, io.IOBase) else str(f))


def write_exported_program(generator: torch.nn.Module, f: Union[Path, BinaryIO], latent_size: int) -> None:
    """``torch.export`` program, any batch size: ``torch.export.load(path).module()(latents[, labels])`` needs
    torch alone."""
    example, dynamic = _example_inputs(generator, latent_size)
    program = torch.export.export(_inference_module(generator), example, dynamic_shapes=dynamic, strict=False)
    torch.export.save(program, f if isinstance(f, io.IOBase) else str(f))


def write_onnx(generator: torch.nn.Module, path: Path, latent_size: int) -> None:
    """ONNX through the ``torch.export``-based (dynamo) exporter, one self-contained file, any batch size."""
    example, dynamic = _example_inputs(generator, latent_size)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" and the like
    try:
        with warnings.catch_warnings():
            # torch's own internals while exporting (e.g. its pytree LeafSpec deprecation): nothing a user can act on
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|onnxscript|copyreg)")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch|onnxscript|copyreg)")
            # latents and labels share their batch dimension, which the exporter names once (and says so)
            warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
            torch.onnx.export(_inference_module(generator), example, str(path),
                              input_names=["latents", "labels"][:len(example)], output_names=["images"],
                              dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False)
    finally:
        onnx_log.setLevel(level)


def _bundle_files(bundle_dir: Path, model_cfg: ModelConfig, task: str, description: str, network: dict,
                  inference: dict, readme: str, label_input: Optional[dict] = None) -> None:
    """The bundle folder's configs and README: metadata (inputs: latents, and labels when given; outputs: images in
    [0, 1]) and ``inference.json``, whose common part (latents, loader, inferer, PNG writer, evaluator) surrounds
    the ``network`` entries and the ``inference`` entries (handlers, extra postprocessing, prepare_batch) given."""
    for sub in ("configs", "models", "docs"):
        (bundle_dir / sub).mkdir(parents=True, exist_ok=True)
    size = model_cfg.latent_size
    inputs = {"latent": {"type": "tuples", "format": "latent", "num_channels": 0, "spatial_shape": [size],
                         "dtype": "float32", "value_range": [], "is_patch_data": False, "channel_def": {}}}
    if label_input is not None:
        inputs["label"] = label_input
    metadata = {
        "version": __version__,
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": _version("numpy"),
        "optional_packages_version": {"pillow": _version("PIL")},
        "task": task,
        "description": description,
        "authors": "mednist-gan contributors",
        "copyright": "Copyright (c) mednist-gan contributors",
        "data_source": "MedNIST (CC BY-SA 4.0), courtesy of Dr. Bradley J. Erickson M.D., Ph.D. (Mayo Clinic)",
        "data_type": "jpeg",
        "network_data_format": {
            "inputs": inputs,
            "outputs": {"pred": {"type": "image", "format": "magnitude", "num_channels": 1,
                                 "spatial_shape": list(model_cfg.image_shape[1:]), "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": False, "channel_def": {"0": "image"}}},
        },
    }
    save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "png",
            "separate_folder": False, "scale": 255, "output_dtype": "$np.uint8", "meta_key_postfix": None}
    config = {
        "imports": ["$import numpy as np"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "output_dir": "./outputs",
        "latent_size": size,
        "num_samples": 10,
        **network,
        # The generator was trained on standard-normal latents (the seed bundle sampled uniform ones).
        "dataset": {"_target_": "Dataset", "data": "$[torch.randn(@latent_size) for i in range(@num_samples)]"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [*inference.pop("before_save", []), save]},
        **inference.pop("handlers", {}),
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "prepare_batch": inference.pop("prepare_batch"), **inference},
        "inferring": ["$@evaluator.run()"],
    }
    (bundle_dir / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    (bundle_dir / "configs" / "inference.json").write_text(json.dumps(config, indent=4))
    (bundle_dir / "docs" / "README.md").write_text(readme)


def write_bundle(model_path: Path, bundle_dir: Path, model_cfg: ModelConfig) -> None:
    """A MONAI bundle folder that ``python -m monai.bundle run inferring`` runs without this package: MONAI's
    ``Generator`` with ``models/model.pt`` loaded into it, as the seed bundle's."""
    network = {
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "network_def": {"_target_": "Generator", "latent_shape": "@latent_size",
                        "start_shape": list(model_cfg.start_shape), "channels": list(model_cfg.g_channels),
                        "strides": list(model_cfg.g_strides)},
        "network": "$@network_def.to(@device)",
    }
    inference = {
        "before_save": [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}],
        "handlers": {"handlers": [{"_target_": "CheckpointLoader", "load_path": "@ckpt_path",
                                   "load_dict": {"model": "@network"}}]},
        "prepare_batch": "$lambda batchdata, *_,**__: (batchdata.to(@device),None,(),{})",
        "val_handlers": "@handlers",
    }
    _bundle_files(bundle_dir, model_cfg, "Generate random hand X-ray images like the MedNIST Hand class",
                  "MONAI Generator trained with mednist-gan; latents are standard normal.", network, inference,
                  _BUNDLE_README)
    shutil.copyfile(model_path, bundle_dir / "models" / MODEL_FILE)


def write_torchscript_bundle(torchscript: Path, bundle_dir: Path, model_cfg: ModelConfig) -> None:
    """A MONAI bundle folder around the TorchScript generator (networks MONAI cannot build, e.g. model.arch=resnet):
    ``python -m monai.bundle run inferring`` runs it with MONAI and torch alone. A class-conditional generator makes
    the class ``class_index`` names (``--class_index 2`` on that command line; ``class_names`` lists them)."""
    size, classes = model_cfg.latent_size, list(model_cfg.classes)
    labels = ("(torch.full((batchdata.shape[0],), @class_index, dtype=torch.long, device=@device),)"
              if classes else "()")
    network = {
        **({"class_names": classes, "class_index": 0} if classes else {}),
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
        "network": "$@network_def.eval()",
    }
    # The sigmoid is inside the TorchScript: the images are saved as they come.
    inference = {"prepare_batch": f"$lambda batchdata, *_, **__: (batchdata.to(@device), None, {labels}, {{}})"}
    label_input = None
    if classes:
        label_input = {"type": "tuples", "format": "class index", "num_channels": 0, "spatial_shape": [],
                       "dtype": "int64", "value_range": [0, len(classes) - 1], "is_patch_data": False,
                       "channel_def": {str(i): name for i, name in enumerate(classes)}}
    what = (f"the MedNIST classes {', '.join(classes)} (one class-conditional generator)" if classes
            else "MedNIST images")
    choose = ("\nA class-conditional generator: `--class_index i` makes class `class_names[i]` "
              f"({', '.join(f'{i} = {c}' for i, c in enumerate(classes))}).\n" if classes else "")
    side = model_cfg.image_shape[-1]
    readme = f"""# MedNIST generator (mednist-gan, model.arch={model_cfg.arch})

`models/model.ts` is TorchScript: latents (N, {size}) standard normal{" and labels (N,) int64" if classes else ""} ->
images (N, 1, {side}, {side}) in [0, 1] (MONAI orientation). MONAI has no such network to build, so this bundle runs the
TorchScript file; torch alone loads it (`torch.jit.load`).

    python -m monai.bundle run inferring --config_file configs/inference.json \\
        --meta_file configs/metadata.json --bundle_root .

writes `num_samples` PNGs to `output_dir`.{choose}
{_DATA_CREDIT}"""
    _bundle_files(bundle_dir, model_cfg, f"Generate {side}x{side} images of {what}",
                  f"A {model_cfg.arch} generator trained with mednist-gan, as TorchScript (models/model.ts); latents "
                  "are standard normal; outputs are images in [0, 1].", network, inference, readme, label_input)
    shutil.copyfile(torchscript, bundle_dir / "models" / "model.ts")


_DATA_CREDIT = """Data: MedNIST, CC BY-SA 4.0, courtesy of Dr. Bradley J. Erickson M.D., Ph.D. (Department of Radiology,
Mayo Clinic), gathered from TCIA, the RSNA Bone Age Challenge and the NIH Chest X-ray dataset.
"""

_BUNDLE_README = """# MedNIST Hand generator (mednist-gan)

A MONAI `Generator` trained with mednist-gan on the MedNIST Hand class (64x64 X-rays).
`models/model.pt` is a flat state_dict with the same keys and shapes as the `mednist_gan` model-zoo
bundle's, and loads into `monai.networks.nets.Generator(latent_shape=64, start_shape=[64, 8, 8],
channels=[32, 16, 8, 1], strides=[2, 2, 2, 1])` with `strict=True`.

Latents: **standard normal** (`torch.randn(64)`), as in training. The network returns logits; a sigmoid
gives images in [0, 1].

    python -m monai.bundle run inferring --config_file configs/inference.json \\
        --meta_file configs/metadata.json --bundle_root .

writes `num_samples` PNGs to `output_dir`.

""" + _DATA_CREDIT


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "unknown"


# Every name an export folder holds: replacing an earlier export never deletes anything else.
EXPORT_NAMES = (MODEL_FILE, EXPORTED_PROGRAM_FILE, TORCHSCRIPT_FILE, ONNX_FILE, BUNDLE_DIR, PROVENANCE_FILE)


def _write_serialized(path: Path, save: Callable[[io.BytesIO], None]) -> None:
    """Serialize into memory, then write the bytes with Python's file I/O: torch's own C++ writers abort the
    process on a full disk, Python raises an OSError that becomes one line."""
    buffer = io.BytesIO()
    save(buffer)
    path.write_bytes(buffer.getbuffer())


def export_generator(generator: torch.nn.Module, model_cfg: ModelConfig, out_dir: Path, provenance: dict,
                     onnx: bool = False, what: str = "export folder") -> Path:
    """Write all exports into ``out_dir`` atomically: a failed or killed export leaves an earlier one in place.

    ``out_dir`` must be missing, empty or an earlier export (``what`` names it in the error otherwise).
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, what, EXPORT_NAMES, "export")
    generator = generator.to("cpu").eval()
    latents = torch.randn(4, model_cfg.latent_size, generator=torch.Generator().manual_seed(0))  # not the global RNG
    with torch.no_grad():
        images = generator(latents, torch.zeros(4, dtype=torch.long)) if _conditional(generator) else generator(latents)
    if not torch.isfinite(images).all():
        raise CheckpointError(f"{what} {out_dir}: not exported: the generator returns non-finite values (NaN/Inf); "
                              "are its weights NaN?")
    try:
        recover_folder(out_dir)
        staging = staging_folder(out_dir)
    except OSError as exc:
        raise output_error(what, out_dir, exc) from None
    try:
        _write_serialized(staging / MODEL_FILE, lambda f: torch.save(generator_state_dict(generator), f))
        _write_serialized(staging / TORCHSCRIPT_FILE, lambda f: write_torchscript(generator, f))
        _write_serialized(staging / EXPORTED_PROGRAM_FILE,
                          lambda f: write_exported_program(generator, f, model_cfg.latent_size))
        files = [MODEL_FILE, EXPORTED_PROGRAM_FILE, TORCHSCRIPT_FILE]
        if onnx:
            write_onnx(generator, staging / ONNX_FILE, model_cfg.latent_size)
            files.append(ONNX_FILE)
        record = dict(provenance)
        if model_cfg.arch == "monai":
            write_bundle(staging / MODEL_FILE, staging / BUNDLE_DIR, model_cfg)
        else:  # MONAI has no such network to build: the bundle runs the TorchScript file
            write_torchscript_bundle(staging / TORCHSCRIPT_FILE, staging / BUNDLE_DIR, model_cfg)
        record.update({
            "mednist_gan_version": __version__,
            "latent_distribution": LATENT_DISTRIBUTION,
            "output": "images (N, 1, H, W) in [0, 1], MONAI orientation (transpose of the JPEG rows/columns)",
            "files": {name: {"sha256": sha256_file(staging / name)} for name in files},
        })
        if model_cfg.classes:  # a class-conditional generator: label i makes class classes[i]
            record["classes"] = list(model_cfg.classes)
            record["inputs"] = "latents (N, latent_size) float32, labels (N,) int64: indices into classes"
        (staging / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, default=str))
        fsync_tree(staging)
        replace_folder(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        recover_folder(out_dir)  # interrupted between the renames: the earlier export goes back in place
        if isinstance(exc, OSError):  # e.g. a full disk; an earlier export in out_dir is untouched
            raise output_error(what, out_dir, exc) from None
        raise
    return out_dir


def export_checkpoint(checkpoint: Path, out_dir: Path, onnx: bool = False) -> Path:
    """``mednist-gan export``: the generator of a training checkpoint (or a run directory's newest), with its
    provenance."""
    check_replaceable(Path(out_dir), "--out", EXPORT_NAMES, "export")  # before the checkpoint is read
    opened = open_generator(checkpoint, checkpoint_only=True)
    return export_generator(opened.network, opened.model_config, out_dir,
                            checkpoint_provenance(opened.source, opened.record), onnx=onnx, what="--out")


def checkpoint_provenance(checkpoint: Path, meta: dict) -> dict:
    ema = meta["config"]["train"].get("ema_decay")
    return {"checkpoint": str(checkpoint.resolve()), "step": meta["state"]["step"],
            "weights": f"exponential moving average (decay {ema})" if ema else "raw generator weights",
            "git_revision": meta.get("git_revision"), "config": meta["config"]}
