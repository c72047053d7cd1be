"""`src/export.py`: every family exports and proves itself against PyTorch; a bad export keeps
nothing usable; int8 keeps the demo model's accuracy.

In-process through `run_task`, as `python src/export.py ...` runs. The checkpoints are
written the way a run writes them (the classifier's state dict under its saved run
config), from untrained tiny models whose zero-initialised heads are given random
weights, so that the logits compared are not all zero. The int8 test uses
`tests/fixtures/digits_vit_tiny.ckpt`: the digits demo model trained by
`python src/train.py experiment=digits_demo trainer.max_epochs=10 scheduler.warmup_steps=20`
(83% on the test split), its best checkpoint without the optimizer's state (training takes
minutes, more than the tests may spend).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from torch import nn

from tests.conftest import FIXTURES, compose_config, tiny_vit
from vitlab.deploy import export as export_module
from vitlab.deploy.export import MODEL_FILES, REJECTED_SUFFIX, export, write_pt2
from vitlab.deploy.labels import read_labels_json
from vitlab.deploy.preprocess import Preprocess
from vitlab.deploy.quantize import quantize_torch
from vitlab.models import MlpMixer, fast
from vitlab.models.layers import Mlp
from vitlab.runs.build import build_classifier, instantiate
from vitlab.runs.tasks import run_task

DEMO_CHECKPOINT = FIXTURES / "digits_vit_tiny.ckpt"
# The smallest configs of each family that still take every path of it: 16x16 digits.
SMALL_VIT = (
    "model=vit_tiny",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.mlp_dim=64",
    "model.num_layers=1",
    "data.image_size=16",
)
FAMILIES = {
    "vit_sincos2d": (*SMALL_VIT, "model.pos_embed=sincos2d"),
    "vit_none_gap": (*SMALL_VIT, "model.pos_embed=none", "model.classifier=gap"),
    # PEG acts after block 0, which the class-token block must not be.
    "vit_conditional": (*SMALL_VIT, "model.pos_embed=conditional", "model.num_layers=2"),
    "vit_rope2d": (*SMALL_VIT, "model.pos_embed=rope2d"),
    "hybrid_resnet": (
        *SMALL_VIT,
        "model.stem=resnet",
        "model.resnet_layers=[1]",
        "model.patch_size=1",
    ),
    # The conv stem takes the place of one block.
    "hybrid_conv": (*SMALL_VIT, "model.stem=conv", "model.num_layers=2"),
    "hybrid_patchify_ln": (*SMALL_VIT, "model.stem=patchify_ln"),
    "mixer": (
        "model=mixer_tiny",
        "model.hidden_dim=32",
        "model.num_blocks=1",
        "model.tokens_mlp_dim=16",
        "model.channels_mlp_dim=64",
        "data.image_size=16",
    ),
    "gmlp": (
        "model=gmlp_tiny",
        "model.hidden_dim=32",
        "model.num_blocks=1",
        "model.ffn_dim=64",
        "data.image_size=16",
    ),
}
CHECK = ("check_images=32", "latency_batches=1")


def write_run_checkpoint(folder: Path, *overrides: str) -> Path:
    """`<folder>/model.ckpt`: what a run's checkpoint holds for its model (the classifier's
    weights and saved hyperparameters), untrained, with a random head."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = compose_config("train", list(overrides), folder)
    classifier = build_classifier(cfg, class_names=instantiate(cfg.data, "data").class_names)
    torch.manual_seed(0)
    nn.init.normal_(classifier.backbone.head.weight)
    path = folder / "model.ckpt"
    torch.save(
        {"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, path
    )
    return path


def official_npz(folder: Path, fixture: str) -> Path:
    """The parameters of a `tests/fixtures` model as a published `.npz` holds them."""
    with np.load(FIXTURES / f"{fixture}.npz") as arrays:
        params = {n: arrays[n] for n in arrays.files if not n.startswith("fixture/")}
    path = folder / f"{fixture}.npz"
    np.savez(path, **params)
    return path


def run_export(make_cfg, ckpt: Path, *overrides: str) -> dict:
    return run_task(export, make_cfg(f"ckpt_path={ckpt}", *overrides, config_name="export"))


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield write_run_checkpoint(tmp_path_factory.mktemp("vit"), *SMALL_VIT)
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def exported_vit(vit_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run folder of one passing export of the small ViT."""
    run = tmp_path_factory.mktemp("export")
    run_task(export, compose_config("export", [f"ckpt_path={vit_checkpoint}", *CHECK], run))
    yield run
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("overrides", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_family_exports_to_onnx_and_passes_the_check(overrides, make_cfg, tmp_path):
    ckpt = write_run_checkpoint(tmp_path / "train", *overrides)
    report = run_export(make_cfg, ckpt, *CHECK)
    onnx_fp32 = report["models"]["ONNX fp32 (model.onnx)"]
    assert onnx_fp32["max_abs_logit_diff"] <= 1e-4 and onnx_fp32["top1_agreement"] == 1.0
    assert (tmp_path / "model.onnx").is_file()


def test_a_passing_export_writes_the_model_its_preprocessing_and_its_class_names(exported_vit):
    assert sorted(p.name for p in exported_vit.glob("*.json")) == [
        "export.json",
        "labels.json",
        "preprocess.json",
        "provenance.json",
        "status.json",
    ]
    preprocess = Preprocess.from_json((exported_vit / "preprocess.json").read_text())
    assert preprocess == Preprocess(image_size=(16, 16), num_channels=1)
    assert read_labels_json(exported_vit) == [str(d) for d in range(10)]
    assert json.loads((exported_vit / "status.json").read_text())["status"] == "completed"


def test_the_onnx_file_takes_any_batch_size(exported_vit):
    (images,) = onnx.load(exported_vit / "model.onnx").graph.input
    batch = images.type.tensor_type.shape.dim[0]
    assert images.name == "images" and batch.dim_param and not batch.dim_value


def test_the_check_runs_on_the_checkpoints_test_split_and_reports_both_accuracies(exported_vit):
    report = json.loads((exported_vit / "export.json").read_text())
    assert report["check_images"] == 32 and "DigitsDataModule" in report["check_data"]
    accuracies = [m["accuracy"] for m in report["models"].values()]
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1] is not None


def test_an_official_npz_is_checked_on_synthetic_images(make_cfg, tmp_path):
    # pt2: the check is the same for both formats, and torch.export alone is the quicker.
    report = run_export(make_cfg, official_npz(tmp_path, "vit_tiny_token"), "format=pt2", *CHECK)
    assert report["kind"] == "official" and report["check_data"].startswith("synthetic")
    assert report["models"]["PT2 fp32 (model.pt2)"]["top1_agreement"] == 1.0
    assert all(m["accuracy"] is None for m in report["models"].values())


def test_an_export_that_computes_something_else_fails_and_keeps_nothing_usable(
    vit_checkpoint, make_cfg, tmp_path, monkeypatch, capsys
):
    def write_another_model(model, path, example):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.bias += 1e-3  # every logit off by 1e-3, every top-1 the same
        return write_pt2(other, path, example)

    monkeypatch.setattr(export_module, "write_pt2", write_another_model)
    with pytest.raises(SystemExit) as exit_info:
        run_export(make_cfg, vit_checkpoint, "format=pt2", *CHECK)
    assert exit_info.value.code == 2
    found = re.search(r"largest logit difference (\S+) \(at most 0.0001", capsys.readouterr().err)
    assert found and float(found[1]) == pytest.approx(1e-3, rel=0.05)
    assert (tmp_path / ("model.pt2" + REJECTED_SUFFIX)).is_file()
    assert not {"model.pt2", "preprocess.json", "labels.json"} & {
        p.name for p in tmp_path.iterdir()
    }
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("format=tflite", r"format='tflite' is not valid: expected one of 'onnx', 'pt2'"),
        ("quantize=int4", r"quantize='int4' is not valid: expected one of 'int8' or null"),
    ],
)
def test_an_unknown_format_or_quantization_is_refused_naming_the_choices(
    override, message, make_cfg, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        run_export(make_cfg, tmp_path / "absent.ckpt", override)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("model.*"))


@pytest.fixture(scope="module", params=list(MODEL_FILES))
def demo_export(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """The demo model exported with int8 to each format, checked on the whole test split:
    the run folder and `export.json`."""
    run = tmp_path_factory.mktemp(request.param)
    overrides = [f"ckpt_path={DEMO_CHECKPOINT}", f"format={request.param}", "quantize=int8"]
    cfg = compose_config("export", [*overrides, "check_images=null", "latency_batches=1"], run)
    yield run, run_task(export, cfg)
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


def test_int8_keeps_the_demo_models_accuracy_on_the_digits_test_split(demo_export):
    _, report = demo_export
    fp32, _, int8 = report["models"].values()
    assert report["check_images"] == 300  # the whole test split
    assert fp32["accuracy"] > 0.8  # a trained model: the comparison means something
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.02
    assert int8["size_bytes"] < fp32["size_bytes"]


def test_the_exported_file_passes_the_check_in_each_format(demo_export):
    _, report = demo_export
    _, exported, _ = report["models"].values()
    assert exported["max_abs_logit_diff"] <= 1e-4 and exported["top1_agreement"] == 1.0


@pytest.mark.parametrize("demo_export", ["pt2"], indirect=True)
def test_pt2_writes_a_torch_export_program_that_takes_any_batch_size(demo_export):
    run, _ = demo_export
    program = torch.export.load(str(run / "model.pt2"))
    assert program.module()(torch.zeros(3, 1, 32, 32)).shape == (3, 10)


def test_export_traces_the_reference_path_not_the_fused_onednn_kernel():
    mlp, x = Mlp(8, 16).eval(), torch.randn(2, 4, 8)
    with torch.no_grad():
        assert fast.fused_linear_gelu(x, mlp.fc1, "tanh") is not None  # eager takes it here
        program = torch.export.export(mlp, (x,))
    assert not [n for n in program.graph.nodes if "mkldnn" in str(n.target)]


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_vit(num_layers=1),
        lambda: MlpMixer(
            16, 4, 10, hidden_dim=32, num_blocks=1, tokens_mlp_dim=16, channels_mlp_dim=64
        ),
    ],
    ids=["vit_class_token_block", "mixer_token_mixing"],
)
def test_the_speed_paths_run_an_int8_model_by_calling_its_layers(build):
    torch.manual_seed(0)
    model = build().eval()
    nn.init.normal_(model.head.weight)
    quantized, images = quantize_torch(model), torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected, got = model(images), quantized(images)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()  # int8 rounding only
    assert fast.is_int8(quantized.head) and not fast.is_int8(model.head)
