"""`PerClassResults`: after the test loop, where the classifier fails, per class and per image.

Top-1 accuracy says how often a model is wrong, not where. This callback watches the test
batches' predictions and, when the test ends, writes to the run folder

- `per_class.csv`: each class's index, name, test images, correct predictions and accuracy;
- `confusion_matrix.csv` and `confusion_matrix.png`: rows the true class, columns the predicted;
- `most_confident_wrong.png`: the test images the model got wrong with the highest probability
  on its (wrong) prediction, each titled `true → predicted (probability)`;

and gives the same to each logger: W&B a table and both images, TensorBoard both figures and
the table as text. The CSV logger gets nothing more: its files already sit in the run folder.

Counts come from torchmetrics' `MulticlassConfusionMatrix`, which sums over every rank of a
DDP test; the per-class accuracy is its diagonal over its row sums, what
`MulticlassAccuracy(average=None)` computes, here from the same counts (so the two files never
disagree, and a class without test images has no accuracy rather than 0). Each rank keeps its
own running top-k of wrong images in fixed-size tensors, so the ranks can `all_gather` them.
Figures are `matplotlib.figure.Figure`, never pyplot: no global state, headless.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix

from vitlab.bounds import NonNegativeInt

PER_CLASS_FILE = "per_class.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
WRONG_PNG = "most_confident_wrong.png"
PER_CLASS_COLUMNS = ("class", "name", "test_images", "correct", "accuracy")
# The logger keys, beside the test metrics.
ACCURACY_KEY, CONFUSION_KEY, WRONG_KEY = (
    "test/per_class_accuracy",
    "test/confusion_matrix",
    "test/most_confident_wrong",
)
# Up to this many classes a confusion matrix cell holds its count; up to the second, the axes
# name every class. Beyond them (CIFAR-100, ImageNet) the matrix is a picture of its diagonal.
ANNOTATED_CLASSES, NAMED_CLASSES = 20, 50
# The characters of a class name shown on an axis and in an image's title: ImageNet's names
# run long ("great white shark, white shark, man-eater, man-eating shark, ...").
AXIS_NAME_CHARS, TITLE_NAME_CHARS = 18, 12
INCHES_PER_CHAR = 0.075  # of a tick label at 8 points
# The image grid: inches per tile, the title band's height as a fraction of an image's, and
# the inches above the grid for the figure's title.
TILE_INCHES, TITLE_BAND, SUPTITLE_INCHES = 2.2, 0.2, 0.35


@dataclass(frozen=True)
class WrongPredictions:
    """Wrong test predictions, most confident first: (n, c, h, w) images in [-1, 1] and, per
    image, the true class, the predicted class and the probability the model gave it."""

    images: torch.Tensor
    true: torch.Tensor
    predicted: torch.Tensor
    confidence: torch.Tensor


class PerClassResults(L.Callback):
    """After test: per-class accuracy, the confusion matrix and the most confidently wrong
    test images, into the run folder and to every logger.

    It reads the logits the module's `test_step` returns (`ImageClassifier` returns them), so
    it costs no second forward. Class names are the module's `hparams.class_names` (saved by
    `ImageClassifier` from the data) if it has them, else the class indices. Every rank
    counts and gathers; rank 0 writes. A test where nothing is wrong writes no image grid
    (the file's absence says so). A failure to write or log is a warning, never a failed run:
    the test metrics still reach the loggers and `metrics.json`.

    Attributes:
        dirpath: the folder the files go to (the run folder, `${paths.output_dir}`); None:
            the trainer's `default_root_dir`.
        num_wrong: how many of the most confidently wrong images the grid shows; 0: no grid.
    """

    def __init__(self, dirpath: str | None = None, num_wrong: NonNegativeInt = 16) -> None:
        if not num_wrong >= 0:
            raise ValueError(
                f"callbacks.per_class.num_wrong={num_wrong!r} must be >= 0 (0: no image grid)"
            )
        self.dirpath = dirpath
        self.num_wrong = num_wrong
        self._confusion: MulticlassConfusionMatrix | None = None
        self._wrong: _MostConfidentWrong | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._confusion, self._wrong = None, None

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        images, labels = batch
        if not (isinstance(outputs, torch.Tensor) and outputs.shape[:1] == labels.shape):
            raise TypeError(
                "PerClassResults reads the logits that test_step returns, (batch, num_classes); "
                f"{type(pl_module).__name__}.test_step returned {type(outputs).__name__}"
            )
        logits = outputs.detach()
        if self._confusion is None:
            self._confusion = MulticlassConfusionMatrix(logits.shape[-1]).to(logits.device)
            if self.num_wrong:
                self._wrong = _MostConfidentWrong(self.num_wrong, images.shape[1:], logits.device)
        predicted = logits.argmax(dim=-1)
        self._confusion.update(predicted, labels)
        if self._wrong is not None:
            self._wrong.update(images, labels, logits.float().softmax(dim=-1))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._confusion is None:  # no test batch
            return
        confusion = self._confusion.compute().cpu()  # every rank: the sum over ranks
        wrong = self._wrong.gathered(pl_module, trainer.world_size) if self._wrong else None
        if not trainer.is_global_zero:
            return
        names = class_names(pl_module, len(confusion))
        try:
            self._write_and_log(trainer, confusion, wrong, names)
        except Exception as err:  # matplotlib, a logger, the disk: the test itself went well
            rank_zero_warn(
                f"PerClassResults wrote no per-class results: {type(err).__name__}: {err}"
            )

    def _write_and_log(
        self,
        trainer: L.Trainer,
        confusion: torch.Tensor,
        wrong: WrongPredictions | None,
        names: list[str],
    ) -> None:
        folder = Path(self.dirpath or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows = per_class_rows(confusion, names)
        _write_csv(folder / PER_CLASS_FILE, PER_CLASS_COLUMNS, rows)
        _write_csv(
            folder / CONFUSION_CSV,
            ("true \\ predicted", *names),
            [(name, *counts) for name, counts in zip(names, confusion.tolist(), strict=True)],
        )
        figures = {
            CONFUSION_KEY: (confusion_matrix_figure(confusion, names), folder / CONFUSION_PNG)
        }
        if wrong is not None and len(wrong.true):
            figures[WRONG_KEY] = (most_confident_wrong_figure(wrong, names), folder / WRONG_PNG)
        else:  # none wrong, or no grid asked for: no file, not even an earlier test's
            (folder / WRONG_PNG).unlink(missing_ok=True)
        for figure, path in figures.values():
            figure.savefig(path, dpi=100)
        log_results(trainer.loggers, rows, figures, trainer.global_step)


def log_results(
    loggers: Sequence[Logger],
    rows: Sequence[Sequence[Any]],
    figures: dict[str, tuple[Figure, Path]],
    step: int,
) -> None:
    """Give each logger the per-class table and the figures (each with the PNG it was saved
    to), under their keys: W&B a table and images, TensorBoard figures and the table as
    Markdown text. Other loggers (CSV) get nothing: the files are in the run folder."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(
                ACCURACY_KEY,
                columns=list(PER_CLASS_COLUMNS),
                data=[list(row) for row in rows],
                step=step,
            )
            for key, (_, path) in figures.items():
                logger.log_image(key, images=[str(path)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(ACCURACY_KEY, _markdown(rows), step)
            for key, (figure, _) in figures.items():
                logger.experiment.add_figure(key, figure, step, close=False)


class _MostConfidentWrong:
    """A running top-k of one rank's wrong predictions by the probability of the predicted
    class. The tensors keep their size, padding marked by confidence -1, so that every rank
    gathers the same shapes."""

    def __init__(self, k: int, image_shape: Sequence[int], device: torch.device) -> None:
        self.k = k
        self.kept = {
            "confidence": torch.full((k,), -1.0, device=device),
            "images": torch.zeros((k, *image_shape), device=device),
            "true": torch.zeros(k, dtype=torch.long, device=device),
            "predicted": torch.zeros(k, dtype=torch.long, device=device),
        }

    def update(self, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor) -> None:
        confidence, predicted = probs.max(dim=-1)
        wrong = predicted != labels
        batch = {
            "confidence": confidence[wrong],
            "images": images[wrong].float(),
            "true": labels[wrong],
            "predicted": predicted[wrong],
        }
        self.kept = _top(
            {key: torch.cat([self.kept[key], batch[key]]) for key in self.kept}, self.k
        )

    def gathered(self, pl_module: L.LightningModule, world_size: int) -> WrongPredictions:
        """The top-k over every rank (every rank must call this), on the CPU, padding dropped."""
        kept = pl_module.all_gather(self.kept)
        if world_size > 1:  # all_gather adds a leading rank dimension only then
            kept = {key: rearrange(value, "r k ... -> (r k) ...") for key, value in kept.items()}
        kept = _top(kept, self.k)
        real = kept["confidence"] >= 0
        return WrongPredictions(**{key: value[real].cpu() for key, value in kept.items()})


def _top(candidates: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k candidates of highest confidence, highest first."""
    best = candidates["confidence"].topk(k).indices
    return {key: value[best] for key, value in candidates.items()}


def class_names(pl_module: L.LightningModule, num_classes: int) -> list[str]:
    """The module's `hparams.class_names`, or the indices "0", "1", ... if it has none."""
    names = pl_module.hparams.get("class_names")
    return [str(name) for name in names] if names else [str(i) for i in range(num_classes)]


def per_class_rows(
    confusion: torch.Tensor, names: Sequence[str]
) -> list[tuple[int, str, int, int, float | None]]:
    """A row per class, as `PER_CLASS_COLUMNS`: index, name, test images, correct, accuracy
    (None for a class without test images). `confusion[i, j]` counts true i predicted j."""
    images, correct = confusion.sum(dim=1).tolist(), confusion.diagonal().tolist()
    return [
        (i, name, n, c, c / n if n else None)
        for i, (name, n, c) in enumerate(zip(names, images, correct, strict=True))
    ]


def confusion_matrix_figure(confusion: torch.Tensor, names: Sequence[str]) -> Figure:
    """The confusion matrix, each row coloured by the fraction of its true class (so rare
    classes show as clearly as common ones); the non-zero counts in their cells and class
    names on the axes while they fit.

    The axes are placed by hand, in inches: a layout engine would cost more than drawing
    the figure, at every test.
    """
    num_classes = len(names)
    total = confusion.sum(dim=1, keepdim=True)
    fractions = (confusion / total.clamp(min=1)).numpy()
    labels = (
        [_short(name, AXIS_NAME_CHARS) for name in names] if num_classes <= NAMED_CLASSES else []
    )
    margin = 0.7 + INCHES_PER_CHAR * max(map(len, labels), default=0)  # axis + tick labels
    side = min(max(4.0, 0.45 * num_classes), 14.0)
    width, height = margin + side + 1.3, margin + side + 0.5  # the colour bar, the title
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((margin / width, margin / height, side / width, side / height))
    shown = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    bar = fig.add_axes(((margin + side + 0.2) / width, margin / height, 0.2 / width, side / height))
    fig.colorbar(shown, cax=bar, label="fraction of the true class")
    if num_classes <= ANNOTATED_CLASSES:
        for i, row in enumerate(confusion.tolist()):
            for j, count in ((j, count) for j, count in enumerate(row) if count):
                colour = "white" if fractions[i, j] > 0.5 else "black"
                ax.text(j, i, count, ha="center", va="center", fontsize=8, color=colour)
    ticks = range(num_classes) if labels else []
    ax.set_xticks(ticks, labels, rotation=90, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set(
        xlabel="predicted", ylabel="true", title=f"Confusion matrix, {int(total.sum())} test images"
    )
    return fig


def most_confident_wrong_figure(wrong: WrongPredictions, names: Sequence[str]) -> Figure:
    """A grid of the wrong images, each titled `true → predicted (probability)`.

    Images are (c, h, w) in [-1, 1]: three channels show as RGB, any other number as the
    first channel in grey. The grid is one mosaic in one Axes, not an Axes per image, which
    would take seconds to lay out at every test.
    """
    count = len(wrong.true)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    images = (wrong.images.clamp(-1, 1) + 1) / 2
    images = images if images.shape[1] == 3 else images[:, :1]
    band = math.ceil(TITLE_BAND * images.shape[-2])
    blanks = torch.ones(rows * columns - count, *images.shape[1:])
    # White margins round each tile, and a band above it for its title.
    tiles = F.pad(torch.cat([images, blanks]), (1, 1, band, 1), value=1.0)
    tile_height, tile_width = tiles.shape[-2:]
    mosaic = rearrange(tiles, "(r k) c h w -> (r h) (k w) c", k=columns).numpy()
    width = TILE_INCHES * columns
    height = width * mosaic.shape[0] / mosaic.shape[1]
    fig = Figure(figsize=(width, height + SUPTITLE_INCHES))
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + SUPTITLE_INCHES)))
    ax.set_axis_off()
    if mosaic.shape[-1] == 3:
        ax.imshow(mosaic, aspect="auto")
    else:
        ax.imshow(mosaic[..., 0], cmap="gray", vmin=0.0, vmax=1.0, aspect="auto")
    true, predicted = wrong.true.tolist(), wrong.predicted.tolist()
    for n, confidence in enumerate(wrong.confidence.tolist()):
        row, column = divmod(n, columns)
        true_name, predicted_name = (
            _short(names[i], TITLE_NAME_CHARS) for i in (true[n], predicted[n])
        )
        title = f"{true_name} → {predicted_name} ({confidence:.2f})"
        x, y = (column + 0.5) * tile_width, row * tile_height + band / 2
        ax.text(x, y, title, ha="center", va="center", fontsize=7)
    fig.suptitle("Most confidently wrong test images: true → predicted (probability)", fontsize=10)
    return fig


def _short(name: str, chars: int) -> str:
    return name if len(name) <= chars else name[: chars - 1] + "…"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(["" if value is None else value for value in row] for row in rows)


def _markdown(rows: Sequence[Sequence[Any]]) -> str:
    """The per-class table in Markdown, which TensorBoard's text tab renders as a table."""
    lines = ["| " + " | ".join(PER_CLASS_COLUMNS) + " |", "|---" * len(PER_CLASS_COLUMNS) + "|"]
    for index, name, images, correct, accuracy in rows:
        shown = "" if accuracy is None else f"{accuracy:.4f}"
        lines.append(f"| {index} | {name} | {images} | {correct} | {shown} |")
    return "\n".join(lines)
