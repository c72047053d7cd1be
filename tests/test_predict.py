"""`src/predict.py` and the ground of `vitlab.deploy`: sources, preprocessing, class names, predictions.

The model is a tiny run checkpoint written in-process (the dict Lightning saves: the
classifier's `state_dict` and its hyperparameters, run config and class names
included), with random weights so that its classes differ; the inputs are PNG and
JPEG files of odd sizes, grey and RGB, and one that is truncated.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from PIL import Image

from tests.conftest import compose_config, tiny_vit
from vitlab.data import ImageFolderDataModule
from vitlab.deploy.labels import (
    class_names_for,
    imagenet_1k_names,
    read_labels_json,
    write_labels_json,
)
from vitlab.deploy.predict import (
    UnreadableImages,
    find_images,
    open_classifier,
    predict,
    predict_files,
)
from vitlab.deploy.preprocess import PREPROCESS_FILE, Preprocess
from vitlab.deploy.source import load_source
from vitlab.errors import CheckpointError, ConfigError, DataError
from vitlab.models import MlpMixer
from vitlab.models.checkpoints import save_official_npz, to_timm
from vitlab.runs.build import build_classifier
from vitlab.runs.tasks import run_task

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TINY_RUN = [
    "data.image_size=16",
    "data.num_channels=3",
    "model.patch_size=4",
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.mlp_dim=32",
]
# name -> (PIL mode, width, height); written as PNG or JPEG by the suffix.
IMAGES = {
    "grey.png": ("L", 37, 23),
    "rgb.png": ("RGB", 23, 37),
    "grey.jpg": ("L", 19, 53),
    "rgb.jpeg": ("RGB", 61, 17),
    "rgba.png": ("RGBA", 16, 16),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run checkpoint of a 1-layer ViT on 16x16 RGB digits, with random weights and named classes."""
    folder = tmp_path_factory.mktemp("run")
    cfg = compose_config("train", TINY_RUN, folder)
    try:
        classifier = build_classifier(cfg, with_optimizer=False, class_names=NAMES)
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in classifier.parameters():
            parameter.normal_(std=0.5)
    path = folder / "last.ckpt"
    torch.save(
        {"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)},
        path,
    )
    return path


def write_image(path: Path, mode: str, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = rng.integers(0, 256, (height, width, *channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of readable images: grey and RGB (and RGBA) PNG and JPEG files of odd sizes."""
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, (name, (mode, width, height)) in enumerate(IMAGES.items()):
        write_image(folder / name, mode, width, height, seed)
    return folder


@pytest.fixture
def truncated(images: Path) -> Path:
    """A JPEG cut off after its first half, in the images folder."""
    whole = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(whole, "JPEG")
    path = images / "truncated.jpg"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    return path


def predict_cfg(tmp_path: Path, *overrides: str):
    return compose_config("predict", list(overrides), tmp_path)


@pytest.fixture(autouse=True)
def clear_hydra() -> None:
    yield
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def all_probs(predictions) -> list[float]:
    return [prob for p in predictions for prob in p.probs]


# --- preprocessing -----------------------------------------------------------------


def test_preprocess_equals_the_datamodules_eval_transform(tmp_path: Path) -> None:
    image = Image.open(write_image(tmp_path / "rgb.png", "RGB", 37, 23)).convert("RGB")
    datamodule = ImageFolderDataModule(
        data_dir=str(tmp_path), batch_size=2, image_size=24, num_channels=3, num_classes=2
    )
    preprocess = Preprocess.from_data_config({"image_size": 24, "num_channels": 3})
    assert torch.equal(preprocess(image), datamodule.eval_transform(image))


def test_preprocess_converts_an_image_to_the_models_colour_mode(tmp_path: Path) -> None:
    grey = Image.open(write_image(tmp_path / "grey.png", "L", 37, 23))
    rgba = Image.open(write_image(tmp_path / "rgba.png", "RGBA", 19, 11))
    as_rgb = Preprocess((16, 16), 3)(grey)
    assert as_rgb.shape == (3, 16, 16)
    assert torch.equal(as_rgb[0], as_rgb[2])
    assert Preprocess((16, 16), 1)(rgba).shape == (1, 16, 16)


def test_preprocess_json_round_trips_and_names_the_transform() -> None:
    preprocess = Preprocess((24, 24), 1)
    text = preprocess.to_json()
    described = json.loads(text)
    assert Preprocess.from_json(text) == preprocess
    assert described["resize"] == {"size": [24, 24], "interpolation": "bilinear", "antialias": True}
    assert (described["color_mode"], described["range"]) == ("L", [-1.0, 1.0])


def test_preprocess_json_of_another_transform_is_refused() -> None:
    described = json.loads(Preprocess((24, 24), 3).to_json())
    described["resize"]["interpolation"] = "nearest"
    with pytest.raises(CheckpointError, match=r"other than vitlab's evaluation transform.*resize"):
        Preprocess.from_json(json.dumps(described))


# --- sources and class names -------------------------------------------------------


def test_a_run_checkpoint_gives_its_backbone_preprocessing_and_class_names(checkpoint) -> None:
    source = load_source(checkpoint)
    weights = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert (source.kind, source.class_names) == ("checkpoint", NAMES)
    assert source.preprocess == Preprocess((16, 16), 3)
    assert torch.equal(source.model.head.weight, weights["backbone.head.weight"])
    assert not source.model.training


def test_a_1000_class_official_file_is_named_by_imagenet(tmp_path: Path) -> None:
    path = save_official_npz(tiny_vit(num_classes=1000), tmp_path / "ViT-tiny.npz")
    names = class_names_for(load_source(path))
    assert names == imagenet_1k_names()
    assert names[:2] == ["tench", "goldfish"]


def test_a_1000_class_timm_file_is_named_by_imagenet(tmp_path: Path) -> None:
    mixer = MlpMixer(
        image_size=16,
        patch_size=4,
        num_classes=1000,
        hidden_dim=16,
        num_blocks=1,
        tokens_mlp_dim=8,
        channels_mlp_dim=32,
    )
    torch.save(to_timm(mixer), tmp_path / "mixer.pth")
    source = load_source(tmp_path / "mixer.pth")
    assert (source.kind, source.preprocess) == ("timm", Preprocess((16, 16), 3))
    assert class_names_for(source) == imagenet_1k_names()


def test_a_timm_vit_file_without_its_name_says_to_set_timm_name(tmp_path: Path) -> None:
    torch.save(to_timm(tiny_vit()), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError) as raised:
        load_source(tmp_path / "vit.pth")
    assert any("timm_name=" in note for note in raised.value.__notes__)


def test_an_official_file_of_another_class_count_is_named_by_index(tmp_path: Path) -> None:
    path = save_official_npz(tiny_vit(num_classes=3), tmp_path / "ViT-tiny.npz")
    assert class_names_for(load_source(path)) == ["0", "1", "2"]


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("missing.ckpt", None, "does not exist"),
        ("weights.bin", b"x", "has the suffix '.bin'"),
        ("broken.ckpt", b"not a zip", "is not a readable PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_no_model_is_refused_naming_it_and_what_is_accepted(
    tmp_path: Path, name: str, content: bytes | None, says: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"model_path=.*{name} {says}.*\.npz"):
        load_source(path)


def test_labels_json_round_trips(tmp_path: Path) -> None:
    write_labels_json(NAMES, tmp_path)
    assert read_labels_json(tmp_path) == NAMES


# --- predictions -------------------------------------------------------------------


def test_csv_has_file_then_topk_names_and_probabilities(checkpoint, images, tmp_path) -> None:
    predict(predict_cfg(tmp_path, f"model_path={checkpoint}", f"inputs={images}", "top_k=3"))
    rows = read_csv(tmp_path / "predictions.csv")
    assert list(rows[0]) == ["file", "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob"]
    assert sorted(Path(row["file"]).name for row in rows) == sorted(IMAGES)
    for row in rows:
        assert {row["top1"], row["top2"], row["top3"]} <= set(NAMES)
        probs = [float(row[f"top{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True)


def test_probabilities_are_the_softmax_of_the_model_on_its_eval_transform(
    checkpoint, images, tmp_path
) -> None:
    file = images / "grey.jpg"
    predict(predict_cfg(tmp_path, f"model_path={checkpoint}", f"inputs={file}", "top_k=10"))
    (row,) = read_csv(tmp_path / "predictions.csv")
    source = load_source(checkpoint)
    image = Image.open(file).convert("RGB")
    expected = torch.softmax(source.model(source.preprocess.transform(image)[None]), -1)[0]
    got = {row[f"top{k}"]: float(row[f"top{k}_prob"]) for k in range(1, 11)}
    assert got == pytest.approx(dict(zip(NAMES, expected.tolist(), strict=True)), abs=1e-6)


def test_batching_does_not_change_the_predictions(checkpoint, images) -> None:
    classifier = open_classifier(str(checkpoint))
    files = find_images(str(images))
    one_by_one = predict_files(classifier, files, top_k=3, batch_size=1)
    together = predict_files(classifier, files, top_k=3, batch_size=32)
    assert [p.classes for p in one_by_one] == [p.classes for p in together]
    assert all_probs(one_by_one) == pytest.approx(all_probs(together), abs=1e-6)


def test_out_json_writes_each_files_classes(checkpoint, images, tmp_path) -> None:
    out = tmp_path / "preds" / "out.json"
    predict(
        predict_cfg(
            tmp_path, f"model_path={checkpoint}", f"inputs={images}/*.png", "top_k=2", f"out={out}"
        )
    )
    records = json.loads(out.read_text())
    assert sorted(Path(r["file"]).name for r in records) == ["grey.png", "rgb.png", "rgba.png"]
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["class"] in NAMES for r in records)


def test_top_k_above_the_class_count_is_capped_and_said(
    checkpoint, images, tmp_path, caplog
) -> None:
    with caplog.at_level(logging.WARNING):
        predict(predict_cfg(tmp_path, f"model_path={checkpoint}", f"inputs={images}", "top_k=50"))
    assert list(read_csv(tmp_path / "predictions.csv")[0])[-1] == "top10_prob"
    assert [r.message for r in caplog.records].count(
        "top_k=50 is more than the model's 10 classes; showing all 10"
    ) == 1


def test_an_unreadable_file_is_listed_and_the_others_are_predicted(
    checkpoint, images, truncated, tmp_path
) -> None:
    cfg = predict_cfg(tmp_path, f"model_path={checkpoint}", f"inputs={images}", "top_k=2")
    with pytest.raises(
        UnreadableImages, match=r"(?s)1 of 6 input files could not.*truncated\.jpg: OSError"
    ):
        predict(cfg)
    rows = {Path(row["file"]).name: row for row in read_csv(tmp_path / "predictions.csv")}
    assert set(rows[truncated.name].values()) == {str(truncated), ""}
    assert all(rows[name]["top1"] in NAMES for name in IMAGES)


@pytest.mark.parametrize(
    ("inputs", "says"),
    [("nowhere", "does not exist"), ("*.nothing", "matched no image files")],
)
def test_inputs_that_name_no_file_are_one_clear_error(
    checkpoint, tmp_path, inputs: str, says: str
) -> None:
    cfg = predict_cfg(tmp_path, f"model_path={checkpoint}", f"inputs={tmp_path / inputs}")
    with pytest.raises(DataError, match=rf"inputs=.*{says}"):
        predict(cfg)


@pytest.mark.parametrize(
    ("override", "says"), [("top_k=0", r"top_k=0 is not valid"), ("out=p.txt", r"\.csv or \.json")]
)
def test_bad_settings_are_refused_before_any_work(checkpoint, images, tmp_path, override, says):
    cfg = predict_cfg(tmp_path, f"model_path={checkpoint}", f"inputs={images}", override)
    with pytest.raises(ConfigError, match=says):
        predict(cfg)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_an_onnx_folder_predicts_as_its_checkpoint(checkpoint, images, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    source = load_source(checkpoint)
    folder = tmp_path / "export"
    folder.mkdir()
    torch.onnx.export(
        source.model,
        (torch.zeros(1, 3, 16, 16),),
        str(folder / "model.onnx"),
        dynamo=False,
        input_names=["images"],
        dynamic_axes={"images": {0: "batch"}},
    )
    (folder / PREPROCESS_FILE).write_text(source.preprocess.to_json())
    write_labels_json(class_names_for(source), folder)
    files = find_images(str(images))
    onnx = predict_files(open_classifier(str(folder)), files, top_k=3, batch_size=4)
    torch_ = predict_files(open_classifier(str(checkpoint)), files, top_k=3, batch_size=4)
    assert [p.classes for p in onnx] == [p.classes for p in torch_]
    assert all_probs(onnx) == pytest.approx(all_probs(torch_), abs=1e-5)


def test_the_run_exits_2_and_records_the_failure_when_a_file_is_unreadable(
    checkpoint, images, truncated, tmp_path, monkeypatch, capsys
) -> None:
    """`run_task`, as `src/predict.py` calls it: the exit status and `status.json`."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    cfg = predict_cfg(tmp_path, f"model_path={checkpoint}", f"inputs={images}")
    with pytest.raises(SystemExit) as exited:
        run_task(predict, cfg)
    assert exited.value.code == 2
    assert f"{truncated}: OSError" in capsys.readouterr().err
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"
