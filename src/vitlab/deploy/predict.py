"""`predict(cfg)`: classify image files with a checkpoint, an official or timm file, or an exported ONNX folder.

What `src/predict.py` runs. Every file is read with PIL (PNG, JPEG, and whatever else
PIL opens, grey or colour, any size) and fed through the model's own evaluation
transform (`Preprocess`), in batches. The top-k classes of each file are printed as a
table and written to `predictions.csv` in the run folder, or to the `.csv` or `.json`
file `out=` names. A file that cannot be read is listed with its reason and the others
are still predicted; the run then ends with `UnreadableImages`, so the exit status
says that not every file was classified.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rich
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from vitlab.deploy.labels import LABELS_FILE, class_names_for, read_labels_json
from vitlab.deploy.preprocess import PREPROCESS_FILE, Preprocess
from vitlab.deploy.source import ACCEPTED, load_source
from vitlab.errors import CheckpointError, ConfigError, DataError
from vitlab.runs.tasks import prepare_run
from vitlab.runs.validate import check_run

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
PREDICTIONS_FILE = "predictions.csv"
OUT_SUFFIXES = (".csv", ".json")
GLOB_CHARACTERS = frozenset("*?[")
# What a folder of inputs is searched for: every suffix PIL can open.
IMAGE_SUFFIXES = frozenset(Image.registered_extensions())


class UnreadableImages(DataError):
    """Some input files could not be read; the others were predicted and written."""


@dataclass(frozen=True)
class Classifier:
    """What prediction needs of a model, whichever file it came from.

    Attributes:
        logits: (b, c, h, w) float32 batch in [-1, 1] -> (b, num_classes) logits.
        preprocess: the model's evaluation transform.
        class_names: the name of each class, in label order.
        label: the model's file or folder, for messages.
    """

    logits: Callable[[torch.Tensor], torch.Tensor]
    preprocess: Preprocess
    class_names: list[str]
    label: str


@dataclass(frozen=True)
class Prediction:
    """One file's top classes, best first, with their softmax probabilities; or why it could not be read."""

    file: str
    classes: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str | None = None


def predict(cfg: DictConfig) -> list[Prediction]:
    """Check the config, find the inputs, open the model, predict every file, write and print the result.

    Raises `DataError` (exit 2) for inputs that name nothing, and `UnreadableImages`
    (exit 2, after the predictions are written) when some files could not be read.
    """
    check_run(cfg)
    out = output_path(cfg.get("out"), cfg.paths.output_dir)
    files = find_images(str(cfg.inputs))
    classifier = open_classifier(str(cfg.model_path), cfg.get("timm_name"), cfg.get("ema", False))
    prepare_run(cfg)
    top_k = cfg.top_k
    if top_k > len(classifier.class_names):
        top_k = len(classifier.class_names)
        log.warning(
            "top_k=%d is more than the model's %d classes; showing all %d",
            cfg.top_k,
            top_k,
            top_k,
        )
    predictions = predict_files(classifier, files, top_k, cfg.batch_size)
    write_predictions(predictions, out, top_k)
    print_predictions(predictions, top_k)
    rich.print(f"[bold]Predictions:[/bold] {out}")
    failed = [p for p in predictions if p.error is not None]
    if failed:
        listing = "".join(f"\n  {p.file}: {p.error}" for p in failed)
        raise UnreadableImages(
            f"{len(failed)} of {len(predictions)} input files could not be read; the others "
            f"were predicted, and every file is listed in {out}:{listing}"
        )
    return predictions


def output_path(out: str | None, output_dir: str) -> Path:
    """`out`, which must end in .csv or .json; by default `<run folder>/predictions.csv`."""
    if out is None:
        return Path(output_dir) / PREDICTIONS_FILE
    path = Path(out).expanduser()
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(
            f"out={out} is not valid: the suffix decides the format; use a .csv or .json path"
        )
    return path


def find_images(inputs: str) -> list[Path]:
    """The files `inputs` names: one file; a folder's image files (by suffix, subfolders
    included); or the files a glob matches. Sorted; a `DataError` if there are none."""
    path = Path(inputs).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    elif GLOB_CHARACTERS & set(inputs):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
    else:
        raise DataError(
            f"inputs={inputs} does not exist; give an image file, a folder of images or a "
            "glob (quoted for the shell: 'inputs=photos/*.jpg')"
        )
    if not files:
        raise DataError(
            f"inputs={inputs} matched no image files (a folder is searched for files with "
            "a suffix PIL reads: .png, .jpg, .jpeg, .bmp, .webp, ...)"
        )
    return sorted(files)


def open_classifier(model_path: str, timm_name: str | None = None, ema: bool = False) -> Classifier:
    """The model `model_path` names: an exported ONNX folder, or any file `load_source` reads
    (a run checkpoint's EMA weights with `ema`)."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if ema:
            raise ConfigError(
                f"ema=true takes a run checkpoint's EMA weights, but model_path={path} is an "
                "exported folder; export with `src/export.py ... ema=true` instead"
            )
        return _onnx_classifier(path)
    source = load_source(path, key="model_path", timm_name=timm_name, ema=ema)
    model = source.model.eval()

    def logits(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images)

    return Classifier(logits, source.preprocess, class_names_for(source), source.label)


def _onnx_classifier(folder: Path) -> Classifier:
    """A folder `src/export.py` wrote, run by onnxruntime on the CPU."""
    onnx_file = folder / ONNX_FILE
    if not onnx_file.is_file():
        raise CheckpointError(
            f"model_path={folder} is a folder without {ONNX_FILE}; give {ACCEPTED}, or a folder "
            f"src/export.py wrote ({ONNX_FILE}, {PREPROCESS_FILE}, {LABELS_FILE})"
        )
    preprocess_file = folder / PREPROCESS_FILE
    if not preprocess_file.is_file():
        raise CheckpointError(
            f"model_path={folder} has no {PREPROCESS_FILE}, so how to feed {ONNX_FILE} is unknown; "
            "export it again with src/export.py"
        )
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for a corrupt or foreign file
        raise CheckpointError(
            f"{onnx_file} is not an ONNX model onnxruntime can run ({type(err).__name__}: {err})"
        ) from err
    input_name = session.get_inputs()[0].name

    def logits(images: torch.Tensor) -> torch.Tensor:
        (output,) = session.run(None, {input_name: images.numpy()})
        return torch.from_numpy(np.asarray(output))

    if (folder / LABELS_FILE).is_file():
        names = read_labels_json(folder / LABELS_FILE)
    else:
        num_classes = session.get_outputs()[0].shape[-1]
        if not isinstance(num_classes, int):
            raise CheckpointError(
                f"model_path={folder} has no {LABELS_FILE} and its output has no fixed class "
                "count; export it again with src/export.py"
            )
        names = [str(index) for index in range(num_classes)]
    preprocess = Preprocess.from_json(preprocess_file.read_text(), label=str(preprocess_file))
    return Classifier(logits, preprocess, names, str(folder))


def predict_files(
    classifier: Classifier, files: Sequence[Path], top_k: int, batch_size: int
) -> list[Prediction]:
    """Every file's top `top_k` classes, in the order of `files`, `batch_size` files at a time.

    A file PIL cannot read (or decode) becomes a `Prediction` with its `error` and no
    classes; the others of its batch are still predicted. A progress bar counts files.
    """
    predictions = []
    with Progress(transient=True) as progress:
        task = progress.add_task("Predicting", total=len(files))
        for batch in _chunks(files, batch_size):
            predictions += _predict_batch(classifier, batch, top_k)
            progress.advance(task, len(batch))
    return predictions


def _predict_batch(classifier: Classifier, files: Sequence[Path], top_k: int) -> list[Prediction]:
    images, errors = {}, {}
    for file in files:
        try:
            with Image.open(file) as image:
                images[file] = classifier.preprocess(image)
        except UnidentifiedImageError:  # its message only repeats the path
            errors[file] = "not an image PIL can read (unknown format or corrupt header)"
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            errors[file] = f"{type(err).__name__}: {err}"
    results = {file: Prediction(str(file), error=reason) for file, reason in errors.items()}
    if images:
        logits = classifier.logits(torch.stack(list(images.values())))
        probs, indices = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        for file, p, i in zip(images, probs.tolist(), indices.tolist(), strict=True):
            names = [classifier.class_names[index] for index in i]
            results[file] = Prediction(str(file), names, i, p)
    return [results[file] for file in files]


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def write_predictions(predictions: Sequence[Prediction], path: Path, top_k: int) -> None:
    """Write `path` as CSV (`file`, `top1`, `top1_prob`, ... `top{k}_prob`; an unreadable
    file's classes empty) or JSON (each file's classes, or its `error`), by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        records = [_json_record(p) for p in predictions]
        path.write_text(json.dumps(records, indent=2) + "\n")
        return
    columns = ["file"] + [f"top{k}{end}" for k in range(1, top_k + 1) for end in ("", "_prob")]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for p in predictions:
            cells = [
                cell
                for name, prob in zip(p.classes, p.probs, strict=True)
                for cell in (name, f"{prob:.6f}")
            ]
            writer.writerow([p.file, *cells, *[""] * (len(columns) - 1 - len(cells))])


def _json_record(prediction: Prediction) -> dict[str, object]:
    if prediction.error is not None:
        return {"file": prediction.file, "error": prediction.error}
    top = zip(prediction.classes, prediction.indices, prediction.probs, strict=True)
    return {
        "file": prediction.file,
        "top_k": [{"class": name, "index": i, "prob": prob} for name, i, prob in top],
    }


def print_predictions(predictions: Sequence[Prediction], top_k: int) -> None:
    """The table: one row per file, its top classes best first as `name probability`, or
    the reason it could not be read. Two columns, so that it stays legible in a narrow terminal."""
    table = Table(title="Predictions", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column(f"top {top_k} (softmax probability)")
    for p in predictions:  # Text, not markup: a file name or a reason may hold "[...]"
        if p.error is not None:
            classes = Text(f"unreadable: {p.error}", style="red")
        else:
            top = zip(p.classes, p.probs, strict=True)
            classes = Text(", ".join(f"{name} {prob:.3f}" for name, prob in top))
        table.add_row(Text(p.file), classes)
    rich.print(table)
