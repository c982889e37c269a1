"""Latents -> images -> PNG files and grids, from any exported generator or a training checkpoint."""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import CheckpointError, MednistGanError, first_line, output_error
from ..files import PROVENANCE_FILE, ensure_writable_folder
from ..images import image_grid, save_png, to_uint8_pictures

LATENTS = ("normal", "uniform")
# The generators used when no --model is given (each folder's MODEL_CARD.md says how it was trained): the Hand
# generator of configs/resnet.yaml, and with --class the six-class one of configs/conditional.yaml;
# assets/generator holds the bundle-architecture one of configs/quality.yaml.
SHIPPED_MODEL = Path(__file__).parents[1] / "assets" / "hand" / "mednist_gan.ts"
SHIPPED_CONDITIONAL = Path(__file__).parents[1] / "assets" / "conditional" / "mednist_gan.ts"
MAX_SAMPLES = 10_000_000  # all latents are drawn at once: 10M of size 128 take 5 GB
MAX_SEED = 2**63 - 1


def shipped_model(class_name: Optional[str] = None) -> Path:
    """The shipped generator for ``generate`` without ``--model``: the Hand one, or the six-class one for ``--class``."""
    return SHIPPED_MODEL if class_name is None else SHIPPED_CONDITIONAL


def load_model(path: Path, latent_size: Optional[int] = None) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Any generator: ``mednist_gan.pt2`` (``torch.export``), ``mednist_gan.ts`` (TorchScript), a ``model.pt``
    state_dict, or a checkpoint folder.

    A ``.pt2`` or TorchScript file need not come from mednist-gan: anything that maps latents (N, L) to images
    (N, 1, 64, 64) in [0, 1] will do. L is read from the module (a ``.pt2``'s input shape, a mednist-gan
    generator's input layer); ``latent_size`` gives it where the module cannot tell, and must agree where it can.
    Returns a function from latents to images in [0, 1] (MONAI orientation) and the latent size.
    """
    # The export module brings MONAI (seconds to import): only the formats that need its Generator load it.
    path = Path(path)
    if latent_size is not None and latent_size < 1:
        raise MednistGanError(f"--latent-size {latent_size}: expected an integer >= 1")
    if path.is_dir():
        from .export import load_checkpoint_generator

        generator, _ = load_checkpoint_generator(path)
        return generator, _agreed_latent_size(path, int(generator.latent_shape[0]), latent_size)
    if not path.is_file():
        raise CheckpointError(f"--model {path}: no such file or folder")
    _verify_against_export_record(path)
    if zipfile.is_zipfile(path) and _is_exported_program(path):
        module, own = _load_exported_program(path)
        return module, _agreed_latent_size(path, own, latent_size)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise CheckpointError(f"--model {path}: not a loadable TorchScript file ({type(exc).__name__})") from None
        return module, _agreed_latent_size(path, _torchscript_latent_size(module), latent_size)
    from .export import load_generator_weights

    generator = load_generator_weights(path)
    return generator, _agreed_latent_size(path, int(generator.latent_shape[0]), latent_size)


def _agreed_latent_size(path: Path, own: Optional[int], given: Optional[int]) -> int:
    if own is None and given is None:
        raise MednistGanError(f"--model {path}: its latent size cannot be read from the module "
                              "(no generator input layer); give it with --latent-size")
    if own is not None and given is not None and own != given:
        raise MednistGanError(f"--latent-size {given}: --model {path} takes latents of size {own}")
    return int(own if own is not None else given)


def _verify_against_export_record(path: Path) -> None:
    """An exported file is checked against the sha256 its ``export.json`` records (when it sits beside one)."""
    from ..checkpoint import verify_recorded_sha256

    record = path.parent / PROVENANCE_FILE
    if not record.exists():
        return
    try:
        expected = json.loads(record.read_text())["files"].get(path.name, {}).get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{record}: unreadable export record ({type(exc).__name__}: {exc})"[:300]) from None
    verify_recorded_sha256(path, expected, record)


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())


def _is_exported_program(path: Path) -> bool:
    """A ``torch.export.save`` archive: ``<name>/archive_format`` holds ``pt2``."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.rsplit("/", 1)[-1] == "archive_format":
                return z.read(name).strip() == b"pt2"
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
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if len(set(names)) != len(names):
                raise CheckpointError(f"--model {path}: not a loadable torch.export program (repeated archive entries)")
            raw, pickled, configs = _pt2_payloads(z, names)
            for name in names:
                inner = name.split("/", 1)[-1]
                maybe_pickle = inner.startswith(_PT2_PICKLE_DIRS) or name.endswith((".pt", ".pkl"))
                if name in pickled or (maybe_pickle and name not in raw and name not in configs):
                    _check_weights_only(path, name, z.read(name))
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"--model {path}: not a loadable torch.export program ({type(exc).__name__})") from None


def _pt2_payloads(z: zipfile.ZipFile, names: list[str]) -> tuple[set[str], set[str], set[str]]:
    """The entries the weights and constants configs name as raw tensor bytes and as pickles, and the configs."""
    raw, pickled, configs = set(), set(), set()
    for name in names:
        root, _, inner = name.partition("/")
        folder = next((d for d in _PT2_PICKLE_DIRS[:2] if inner.startswith(d)), None)
        if folder is None or not name.endswith("_config.json"):
            continue
        configs.add(name)
        for meta in json.loads(z.read(name))["config"].values():
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


def _torchscript_latent_size(module: torch.jit.ScriptModule) -> Optional[int]:
    """A mednist-gan (MONAI Generator) TorchScript's latent size, from its input layer; None for other modules."""
    for name, param in module.named_parameters():
        if name.endswith("linear.weight") and param.dim() == 2:
            return int(param.shape[1])
    return None


def run_generator(net: Callable[..., torch.Tensor], latents: torch.Tensor, model: Path,
                  image_size: Optional[tuple[int, int]] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``net(latents)`` (``net(latents, labels)`` for a class-conditional generator), held to the documented
    interface: images (N, 1, H, W) (H, W = ``image_size`` if given)."""
    try:
        images = net(latents) if labels is None else net(latents, labels)
    except Exception as exc:  # a foreign generator that does not take (N, L) latents
        given = f"latents of shape {tuple(latents.shape)}" + ("" if labels is None else " and class labels")
        raise MednistGanError(f"--model {model}: failed on {given} "
                              f"({type(exc).__name__}: {first_line(exc, 120)})") from None
    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
    if (not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[:2]) != (len(latents), 1)
            or (image_size is not None and tuple(images.shape[2:]) != tuple(image_size))):
        size = ", ".join(map(str, image_size)) if image_size is not None else "H, W"
        raise MednistGanError(f"--model {model}: returned {shape} for {len(latents)} latents; "
                              f"expected images ({len(latents)}, 1, {size})")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise MednistGanError(f"--model {model}: the generator returned non-finite values (NaN/Inf) for {bad} of "
                              f"{images.numel()} pixels of {len(latents)} images; expected images in [0, 1] "
                              "(are its weights NaN?)")
    return images


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True):
    """A tqdm bar on stderr when it is a terminal; nothing at all otherwise (logs, pipes, tests)."""
    from tqdm import tqdm

    # disable=None: tqdm shows the bar only when its stream (stderr) is a terminal
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False, dynamic_ncols=True)


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise MednistGanError(f"--seed {seed}: expected an integer from 0 to 2**63 - 1")


def check_device(device: Optional[str]) -> str:
    """``--device``: cpu, cuda or cuda:N (a GPU that is visible); None: cuda when there is one, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise MednistGanError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device != "cpu":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise MednistGanError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
        if match.group(1) is not None and int(match.group(1)) >= visible:
            raise MednistGanError(f"--device {device}: {visible} CUDA GPU(s) visible (cuda:0 to cuda:{visible - 1})")
    return device


def make_latents(n: int, size: int, seed: int, distribution: str = "normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        return torch.randn(n, size, generator=g)
    if distribution == "uniform":
        return torch.rand(n, size, generator=g)
    raise MednistGanError(f"--latent {distribution!r}: expected one of {', '.join(LATENTS)}")


def _save_pngs(pictures: np.ndarray, paths: list[Path]) -> None:
    for picture, path in zip(pictures, paths):
        save_png(picture, path)


def generator_classes(path: Path) -> Optional[list[str]]:
    """The class names of a class-conditional generator, in label order (``export.json``'s ``classes`` beside an
    exported file or in an export folder; a checkpoint's model config); None for an unconditional one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    record = folder / PROVENANCE_FILE
    try:
        if record.is_file():
            classes = json.loads(record.read_text()).get("classes")
        elif path.is_dir():
            from ..checkpoint import read_meta, resolve

            record = path
            classes = read_meta(resolve(path))["config"]["model"].get("classes")
        else:
            classes = None
    except (OSError, ValueError, AttributeError, KeyError, TypeError, MednistGanError):
        return None  # load_model has already refused an unreadable record or checkpoint
    if not classes:
        return None
    if not isinstance(classes, list):
        raise CheckpointError(f"{record}: classes {classes!r}: expected a list of class names")
    from ..config import check_class_name

    for name in classes:
        check_class_name(name, str(record), CheckpointError)  # --class all writes <output-dir>/<class>/
    return list(classes)


def chosen_classes(model: Path, classes: Optional[list[str]], asked: Optional[str]) -> list[Optional[str]]:
    """The classes to generate: [None] for an unconditional generator; the one named by ``--class``, or every
    class for ``--class all``, for a conditional one (which needs ``--class``)."""
    if classes is None:
        if asked is not None:
            raise MednistGanError(f"--class {asked}: --model {model} is an unconditional generator (one class); "
                                  "leave --class out")
        return [None]
    if asked is None:
        raise MednistGanError(f"--model {model}: a class-conditional generator of {', '.join(classes)}; "
                              "name the class with --class NAME, or --class all")
    if asked == "all":
        return list(classes)
    if asked not in classes:
        raise MednistGanError(f"--class {asked}: --model {model} makes {', '.join(classes)} (or --class all)")
    return [asked]


def generate(model: Path, num_samples: int, output_dir: Path, seed: int = 0, batch_size: int = 256,
             grid: Optional[Path] = None, latent: str = "normal", device: Optional[str] = None,
             latent_size: Optional[int] = None, class_name: Optional[str] = None) -> list[Path]:
    """Write ``num_samples`` PNGs (``sample_00000.png``, ...) and optionally a grid; returns the PNG paths.

    A class-conditional generator makes the class ``class_name`` names, or with ``"all"`` ``num_samples`` of each
    class into ``<output_dir>/<class>/`` from the same latents, and a grid with one row per class.
    """
    if num_samples < 1:
        raise MednistGanError(f"--num-samples {num_samples}: expected an integer >= 1")
    if num_samples > MAX_SAMPLES:
        raise MednistGanError(f"--num-samples {num_samples}: expected at most {MAX_SAMPLES:,} (for more, run again "
                              "with another --seed and --output-dir)")
    if batch_size < 1:
        raise MednistGanError(f"--batch-size {batch_size}: expected an integer >= 1")
    check_seed(seed)
    device = check_device(device)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise MednistGanError(f"--output-dir {output_dir}: exists and is not a folder")
    net, latent_size = load_model(model, latent_size)
    classes = generator_classes(model)
    chosen = chosen_classes(model, classes, class_name)
    net = net.to(device)
    latents = make_latents(num_samples, latent_size, seed, latent)
    per_class = len(chosen) > 1
    folders = [output_dir / name if per_class else output_dir for name in chosen]
    for folder in folders:
        ensure_writable_folder(folder, "--output-dir")
    if grid is not None:
        ensure_writable_folder(Path(grid).parent, "--grid")
    width = max(5, len(str(num_samples - 1)))
    columns = min(8, num_samples) if per_class else None
    shown = columns or 64  # the grid: the first 64 images, or the first 8 of every class
    paths, pictures, writes = [], [], deque()
    writers = max(2, os.cpu_count() or 2)
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=writers) as pool, \
            progress_bar(num_samples * len(chosen), "generate") as bar:  # zlib releases the GIL
        try:
            for name, folder in zip(chosen, folders):
                class_paths = [folder / f"sample_{i:0{width}d}.png" for i in range(num_samples)]
                paths += class_paths
                for start in range(0, num_samples, batch_size):
                    z = latents[start:start + batch_size].to(device)
                    labels = (None if name is None else
                              torch.full((len(z),), classes.index(name), dtype=torch.long, device=device))
                    batch = to_uint8_pictures(run_generator(net, z, model, labels=labels))
                    bar.update(len(batch))
                    chunk = max(1, math.ceil(len(batch) / writers))  # one task per writer and batch, not one per image
                    writes += [pool.submit(_save_pngs, batch[i:i + chunk], class_paths[start + i:start + i + chunk])
                               for i in range(0, len(batch), chunk)]
                    while writes and writes[0].done():
                        writes.popleft().result()  # a failed write (a full disk) stops generating at once
                    if start < shown:
                        pictures.append(batch[: shown - start])
            while writes:
                writes.popleft().result()
        except OSError as exc:
            pool.shutdown(cancel_futures=True)
            raise output_error("--output-dir", output_dir, exc) from None
    if grid is not None:
        try:
            save_png(image_grid(np.concatenate(pictures), columns), Path(grid))
        except OSError as exc:
            raise output_error("--grid", grid, exc) from None
    return paths
