"""One way in for a generator: ``open_generator`` opens any of them, checks it once, and says what it is.

It takes a run directory (its newest intact checkpoint), a checkpoint folder, an export folder (the folder
``mednist-gan export`` writes), or one file: ``mednist_gan.pt2`` (``torch.export``), ``mednist_gan.ts``
(TorchScript) or ``model.pt`` (a flat state_dict, the bundle's format). A ``.pt2`` or TorchScript file need
not come from mednist-gan: anything that maps latents (N, L) to images (N, 1, 64, 64) in [0, 1] will do.

What is checked, each once: a checkpoint's files against the sizes and sha256 its metadata records; an
exported file against the sha256 its ``export.json`` records; every pickle a ``.pt2`` may unpickle, with
``weights_only`` before ``torch.export.load`` sees it; class names (each becomes a folder name); the latent
size the module shows against the one given. Every failure is one line.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import EMA_FILE, G_FILE, META, checkpoints_dir, resolve_with_meta, verify_recorded_sha256
from ..config import ModelConfig, check_class_name
from ..errors import CheckpointError, MednistGanError, first_line
from ..files import PROVENANCE_FILE

MODEL_FILE = "model.pt"
TORCHSCRIPT_FILE = "mednist_gan.ts"
EXPORTED_PROGRAM_FILE = "mednist_gan.pt2"
# The file an export folder is opened by: TorchScript first (torch alone runs it, no MONAI import).
EXPORT_FOLDER_PREFERENCE = (TORCHSCRIPT_FILE, EXPORTED_PROGRAM_FILE, MODEL_FILE)

CHECKPOINT, WEIGHTS, EXPORTED_PROGRAM, TORCHSCRIPT = "checkpoint", "weights", "exported program", "torchscript"


@dataclass
class OpenedGenerator:
    """A generator ready to run, and what is known about it."""

    network: Callable[..., torch.Tensor]  # latents (N, L) [, labels (N,) int64] -> images (N, 1, H, W) in [0, 1]
    latent_size: int  # L
    classes: Optional[list[str]]  # a class-conditional generator's classes, in label order; None: unconditional
    record: Optional[dict]  # the checkpoint's metadata, or the export.json beside the file; None without one
    source: Path  # what the network was read from: the checkpoint folder (a run directory's: resolved) or the file
    model_config: Optional[ModelConfig]  # the architecture the weights were built with (a checkpoint, a model.pt)
    kind: str  # CHECKPOINT, WEIGHTS (model.pt), EXPORTED_PROGRAM (.pt2) or TORCHSCRIPT

    def label(self, class_name: Optional[str]) -> Optional[int]:
        """The label that makes ``class_name`` (None for an unconditional generator)."""
        return None if self.classes is None else self.classes.index(class_name)


def is_training_checkpoint(path: Path) -> bool:
    """A checkpoint folder, or a run directory with a checkpoints folder."""
    path = Path(path)
    return (path / META).is_file() or checkpoints_dir(path).is_dir()


def open_generator(path: Path, latent_size: Optional[int] = None, *, checkpoint_only: bool = False) -> OpenedGenerator:
    """Any generator, verified once (see the module's description).

    L is read from the module (a checkpoint's or ``model.pt``'s architecture, a ``.pt2``'s input shape, a
    mednist-gan TorchScript's input layer); ``latent_size`` gives it where the module cannot tell, and must
    agree where it can. ``checkpoint_only`` (``export``, ``sweep-report``): a checkpoint folder or a run
    directory, nothing else (anything else is "not a complete checkpoint").
    """
    path = Path(path)
    if latent_size is not None and latent_size < 1:
        raise MednistGanError(f"--latent-size {latent_size}: expected an integer >= 1")
    if checkpoint_only and not is_training_checkpoint(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {META})")
    if path.is_dir():
        if is_training_checkpoint(path) or not (path / PROVENANCE_FILE).is_file():
            return _open_checkpoint(path, latent_size)  # what is neither names itself "not a complete checkpoint"
        record = _read_record(path / PROVENANCE_FILE)
        path = _export_folder_file(path)
    elif path.is_file():
        record = _read_record(path.parent / PROVENANCE_FILE)
    else:
        raise CheckpointError(f"--model {path}: no such file or folder")
    return _open_file(path, record, latent_size)


# ----------------------------------------------------------------------------- checkpoints and model.pt

def _open_checkpoint(path: Path, latent_size: Optional[int]) -> OpenedGenerator:
    """The generator (with its sigmoid) of a training checkpoint folder, or of a run directory's newest.

    With ``train.ema_decay`` the checkpoint holds the moving-average weights too, and those are used.
    """
    from safetensors.torch import load_file

    checkpoint, meta = resolve_with_meta(path)  # verified: each file as it was written
    model_config = ModelConfig.from_record(meta["config"]["model"], checkpoint / META)
    weights = checkpoint / EMA_FILE
    if not weights.is_file():
        weights = checkpoint / G_FILE
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint}: no generator weights (model.safetensors) in this checkpoint")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: unreadable checkpoint file ({type(exc).__name__}: "
                              f"{first_line(exc, 120)})") from None
    generator = _built_generator(model_config, state, weights)
    return OpenedGenerator(generator, _agreed_latent_size(path, int(generator.latent_shape[0]), latent_size),
                           _checked_classes(model_config.classes, path), meta, checkpoint, model_config, CHECKPOINT)


def _open_weights(path: Path, model_config: ModelConfig) -> torch.nn.Module:
    """A flat generator state_dict (``model.pt``, the bundle's format) into a generator with its sigmoid."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not loadable as generator weights ({type(exc).__name__}: "
                              f"{first_line(exc, 160)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # the bundle's training checkpoints wrap the weights as {"model": ...}
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state_dict of generator weights, found {type(state).__name__}")
    return _built_generator(model_config, state, path)


def _built_generator(model_config: ModelConfig, state: dict, source: Path) -> torch.nn.Module:
    """A generator of ``model_config``'s architecture holding exactly the weights of ``state``, in eval mode."""
    from ..models.networks import build_generator  # MONAI (seconds to import): only the formats that need it

    generator = build_generator(model_config, init=False)
    expected = generator.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r}: not weights of this generator architecture")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                                  f"this generator needs {tuple(value.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r}: not weights of this generator architecture")
    generator.load_state_dict(state, strict=True)
    return generator.eval()


# ----------------------------------------------------------------------------- exported files and their record

def _open_file(path: Path, record: Optional[dict], latent_size: Optional[int]) -> OpenedGenerator:
    record_path = path.parent / PROVENANCE_FILE
    classes = None
    if record is not None:
        verify_recorded_sha256(path, _recorded_sha256(record, path.name, record_path), record_path)
        classes = _recorded_classes(record, record_path)
    model_config = None
    if zipfile.is_zipfile(path) and _is_exported_program(path):
        network, own = _load_exported_program(path)
        kind = EXPORTED_PROGRAM
    elif zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            network = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise CheckpointError(f"--model {path}: not a loadable TorchScript file ({type(exc).__name__})") from None
        own, kind = _torchscript_latent_size(network), TORCHSCRIPT
    else:
        model_config = _recorded_model_config(record, record_path, path)
        network = _open_weights(path, model_config)
        own, kind = int(network.latent_shape[0]), WEIGHTS
    return OpenedGenerator(network, _agreed_latent_size(path, own, latent_size), classes, record, path,
                           model_config, kind)


def _read_record(record_path: Path) -> Optional[dict]:
    """The ``export.json`` at ``record_path``, or None where there is none."""
    if not record_path.exists():
        return None
    try:
        return json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        raise _unreadable_record(record_path, exc) from None


def _unreadable_record(record_path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{record_path}: unreadable export record ({type(exc).__name__}: {exc})"[:300])


def _recorded_sha256(record: dict, name: str, record_path: Path) -> Optional[str]:
    try:
        return record["files"].get(name, {}).get("sha256")
    except (KeyError, TypeError, AttributeError) as exc:
        raise _unreadable_record(record_path, exc) from None


def _recorded_classes(record: dict, record_path: Path) -> Optional[list[str]]:
    """``export.json``'s ``classes`` (a class-conditional generator's, in label order), checked; None: unconditional."""
    classes = record.get("classes")
    if not classes:
        return None
    if not isinstance(classes, list):
        raise CheckpointError(f"{record_path}: classes {classes!r}: expected a list of class names")
    return _checked_classes(classes, record_path)


def _checked_classes(classes: list, what: Path) -> Optional[list[str]]:
    for name in classes:
        check_class_name(name, str(what), CheckpointError)  # --class all writes <output-dir>/<class>/
    return list(classes) or None


def _recorded_model_config(record: Optional[dict], record_path: Path, path: Path) -> ModelConfig:
    """The architecture of a ``model.pt``: its ``export.json``'s, or the seed bundle's where it has none."""
    if record is None:
        return ModelConfig()
    try:
        return ModelConfig.from_record(record["config"]["model"], record_path)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{record_path}: unreadable export provenance, needed for the architecture of "
                              f"{path.name} ({type(exc).__name__}: {first_line(exc, 120)})") from None


def _export_folder_file(folder: Path) -> Path:
    for name in EXPORT_FOLDER_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"--model {folder}: an export folder without a generator file "
                          f"({', '.join(EXPORT_FOLDER_PREFERENCE)})")


def _agreed_latent_size(path: Path, own: Optional[int], given: Optional[int]) -> int:
    if own is None and given is None:
        raise MednistGanError(f"--model {path}: its latent size cannot be read from the module "
                              "(no generator input layer); give it with --latent-size")
    if own is not None and given is not None and own != given:
        raise MednistGanError(f"--latent-size {given}: --model {path} takes latents of size {own}")
    return int(own if own is not None else given)


# ----------------------------------------------------------------------------- TorchScript and torch.export files

def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _torchscript_latent_size(module: torch.jit.ScriptModule) -> Optional[int]:
    """A mednist-gan (MONAI Generator) TorchScript's latent size, from its input layer; None for other modules."""
    for name, param in module.named_parameters():
        if name.endswith("linear.weight") and param.dim() == 2:
            return int(param.shape[1])
    return None


def _is_exported_program(path: Path) -> bool:
    """A ``torch.export.save`` archive: ``<name>/archive_format`` holds ``pt2``."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.rsplit("/", 1)[-1] == "archive_format":
                return archive.read(name).strip() == b"pt2"
    return False


def _load_exported_program(path: Path) -> tuple[torch.nn.Module, Optional[int]]:
    """The program's module (torch alone runs it) and its latent size, when its input has a fixed second dimension."""
    _refuse_pickled_code(path)
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:
        raise CheckpointError(f"--model {path}: not a loadable torch.export program ({type(exc).__name__})") from None
    inputs = [node for node in program.graph.nodes
              if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    latent = None
    if len(inputs) in (1, 2):  # latents, or latents and labels (a class-conditional generator)
        shape = getattr(inputs[0].meta.get("val"), "shape", ())
        if len(shape) == 2 and isinstance(shape[1], int):
            latent = int(shape[1])
    return module, latent


_PT2_PICKLE_DIRS = ("data/weights/", "data/constants/", "data/sample_inputs/")


def _refuse_pickled_code(path: Path) -> None:
    """``torch.export.load`` unpickles some entries of a ``.pt2`` without ``weights_only``: weights and constants
    stored pickled, sample inputs that fail the safe load, and the older layout's ``.pt`` entries. Each entry it
    may unpickle must load with ``weights_only`` here first, so that no pickled code runs."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(set(names)) != len(names):
                raise CheckpointError(f"--model {path}: not a loadable torch.export program (repeated archive entries)")
            raw, pickled, configs = _pt2_payloads(archive, names)
            for name in names:
                inner = name.split("/", 1)[-1]
                maybe_pickle = inner.startswith(_PT2_PICKLE_DIRS) or name.endswith((".pt", ".pkl"))
                if name in pickled or (maybe_pickle and name not in raw and name not in configs):
                    _check_weights_only(path, name, archive.read(name))
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"--model {path}: not a loadable torch.export program ({type(exc).__name__})") from None


def _pt2_payloads(archive: zipfile.ZipFile, names: list[str]) -> tuple[set[str], set[str], set[str]]:
    """The entries the weights and constants configs name as raw tensor bytes and as pickles, and the configs."""
    raw, pickled, configs = set(), set(), set()
    for name in names:
        root, _, inner = name.partition("/")
        folder = next((d for d in _PT2_PICKLE_DIRS[:2] if inner.startswith(d)), None)
        if folder is None or not name.endswith("_config.json"):
            continue
        configs.add(name)
        for meta in json.loads(archive.read(name))["config"].values():
            entry = f"{root}/{os.path.join(folder, meta['path_name'])}"
            tensor = folder == "data/weights/" or meta["path_name"].startswith("tensor_")  # not custom objects
            (raw if tensor and not meta.get("use_pickle") else pickled).add(entry)
    return raw - pickled, pickled, configs


def _check_weights_only(path: Path, name: str, data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the weights-only unpickler's note on the pickle protocol
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")),
                      type(exc).__name__)
        raise CheckpointError(f"{path}: refused, it holds pickled objects other than tensors "
                              f"({name}: {reason[:120]})") from None
