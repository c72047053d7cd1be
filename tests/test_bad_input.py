"""Every user mistake stops the run before training with a message naming the key, the value and what is valid."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from vitlab.bench.race import bench
from vitlab.errors import CheckpointError, ConfigError
from vitlab.runs.tasks import evaluate, run_task, train

GROUPS = ["model", "data", "optimizer", "scheduler", "trainer", "logger", "experiment"]


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_option_of_a_group_lists_the_available_ones(make_cfg, group):
    with pytest.raises(
        MissingConfigException, match=rf"(?s){group}/no_such_option.*Available options"
    ):
        make_cfg(f"{group}=no_such_option")


def test_a_typo_in_a_key_is_refused_by_name(make_cfg):
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'model\.patch_sise'"):
        make_cfg("model.patch_sise=8")


# The catalogue: (entry point, overrides, what the one message must say). Each runs in-process
# through `run_task`, as `python src/<entry>.py overrides...` would, and must exit with status 2,
# a message naming the key, and no traceback.
REFUSED = [
    # The four that once ended in a traceback.
    (
        "train",
        ["trainer.accumulate_grad_batches=0"],
        r"trainer.accumulate_grad_batches=0 is not valid: must be >= 1",
    ),
    (
        "train",
        ["compile=banana"],
        r"compile='banana' is not valid: expected true or false or a mapping or null",
    ),
    (
        "train",
        ["seed=abc"],
        r"seed='abc' is not valid: expected an integer in \[0, 4294967295\] or null",
    ),
    ("eval", [], r"ckpt_path='\?\?\?' is not valid: required: set ckpt_path="),
    # Types: a word or a list where a number belongs.
    (
        "train",
        ["trainer.max_epochs=abc"],
        r"trainer.max_epochs='abc' is not valid: expected an integer or null",
    ),
    (
        "train",
        ["data.batch_size=[64]"],
        r"data.batch_size=\[64\] is not valid: expected an integer",
    ),
    ("train", ["optimizer.lr=fast"], r"optimizer.lr='fast' is not valid: expected a number"),
    (
        "train",
        ["model.dropout_rate=high"],
        r"model.dropout_rate='high' is not valid: expected a number in \[0, 1\)",
    ),
    (
        "train",
        ["model.grad_checkpointing=3"],
        r"model.grad_checkpointing=3 is not valid: expected true or false",
    ),
    ("bench", ["bench.steps=two"], r"bench.steps='two' is not valid: expected an integer >= 1"),
    # Ranges.
    ("train", ["optimizer.lr=0"], r"optimizer.lr=0 is not valid: use a positive number"),
    ("train", ["optimizer.lr=-0.1"], r"optimizer.lr=-0.1 is not valid"),
    (
        "train",
        ["optimizer.weight_decay=-1"],
        r"optimizer.weight_decay=-1 is not valid: use a number >= 0",
    ),
    (
        "train",
        ["optimizer.betas=[0.9,1.5]"],
        r"optimizer.betas=\[0.9, 1.5\] is not valid: use two numbers in \[0, 1\)",
    ),
    (
        "train",
        ["trainer.max_steps=0"],
        r"trainer.max_steps=0 is not valid: use a positive number, or -1",
    ),
    ("train", ["trainer.max_epochs=0"], r"trainer.max_epochs=0 is not valid"),
    (
        "train",
        ["trainer.devices=0"],
        r"trainer.devices=0 is not valid: use a number of devices >= 1",
    ),
    (
        "train",
        ["trainer.limit_train_batches=1.5"],
        r"trainer.limit_train_batches=1.5 is not valid: use a fraction",
    ),
    ("train", ["data.batch_size=0"], r"data.batch_size=0 is not valid: expected an integer >= 1"),
    (
        "train",
        ["data.num_workers=-1"],
        r"data.num_workers=-1 is not valid: expected an integer >= 0",
    ),
    (
        "train",
        ["loss.label_smoothing=1.0"],
        r"loss.label_smoothing=1.0 is not valid: expected a number in \[0, 1\)",
    ),
    ("train", ["loss.label_smoothing=-0.1"], r"loss.label_smoothing=-0.1 is not valid"),
    (
        "train",
        ["scheduler.warmup_steps=-5"],
        r"scheduler.warmup_steps=-5 is not valid: expected an integer >= 0",
    ),
    (
        "train",
        ["callbacks.throughput.peak_flops=0"],
        r"callbacks.throughput.peak_flops=0 is not valid: expected a number > 0 or null",
    ),
    ("bench", ["bench.rounds=0"], r"bench.rounds=0 is not valid: expected an integer >= 1"),
    # Choices: the valid ones are listed.
    (
        "train",
        ["model.classifier=tok"],
        r"model.classifier='tok' is not valid: expected one of 'token', 'gap'",
    ),
    (
        "train",
        ["model.pos_embed=rope"],
        r"model.pos_embed='rope' is not valid: expected one of 'learned', 'sincos2d'",
    ),
    (
        "train",
        ["trainer.precision=17"],
        r"trainer.precision=17 is not valid: expected one of 64, 32, 16, .*'bf16-mixed'",
    ),
    (
        "train",
        ["trainer.gradient_clip_algorithm=max"],
        r"trainer.gradient_clip_algorithm='max' is not valid: use one of 'norm', 'value'",
    ),
    (
        "train",
        ["trainer.accelerator=tpu2"],
        r"trainer.accelerator='tpu2' is not valid: use one of 'auto', 'cpu'",
    ),
    ("train", ["resume=yes"], r"resume='yes' is not valid: expected one of 'auto' or null"),
    (
        "train",
        ["+model.patch_sise=8"],
        r"model.patch_sise=8 is not valid: VisionTransformer has no such argument; its arguments: image_size, patch_size",
    ),
    (
        "train",
        ["+extras.print=false"],
        r"extras.print=False is not valid: Extras has no such argument",
    ),
    # Cross-key rules.
    (
        "train",
        ["model.num_heads=3"],
        r"model.num_heads=3 is not valid: hidden_size=64 is not divisible by num_heads=3",
    ),
    (
        "train",
        ["model.patch_size=5"],
        r"model.patch_size=5 is not valid: patch_size=5 does not divide image_size=32; valid patch sizes: \[1, 2, 4, 8, 16, 32\]",
    ),
    (
        "train",
        ["model=r50_vit_b16", "data.image_size=40"],
        r"model.patch_size=1 is not valid: patch_size=1 does not divide the stem's 2x2 feature map",
    ),
    (
        "train",
        ["model.flexi_patch_sizes=[4,5]"],
        r"model.flexi_patch_sizes=\[4, 5\] is not valid: patch_size=5 does not divide image_size=32",
    ),
    (
        "train",
        ["model.flexi_patch_sizes=[4,8]", "model.stem=conv", "model.patch_size=8"],
        r"model.flexi_patch_sizes=\[4, 8\] is not valid: the conv stem is built for patch_size=8 .* multiple of 8",
    ),
    (
        "train",
        ["model.pos_embed=conditional", "model.token_merging=4"],
        r"model.token_merging=4 changes which tokens .* model.pos_embed='conditional' needs every token",
    ),
    (
        "train",
        ["model.pos_embed=rope2d", "model.patch_dropout=0.5"],
        r"model.patch_dropout=0.5 changes which tokens .* model.pos_embed='rope2d' needs every token",
    ),
    (
        "train",
        ["trainer.accumulate_grad_batches=3"],
        r"data.batch_size=64 .*world size 1 .*accumulate_grad_batches=3 = 3 micro-batches",
    ),
    ("train", ["trainer=ddp_cpu", "trainer.devices=3"], r"data.batch_size=64 .*world size 3"),
    ("train", ["trainer.precision=16-mixed"], r"trainer.precision=16-mixed needs a CUDA GPU"),
    ("train", ["trainer=gpu"], r"trainer.accelerator=gpu but this machine has no CUDA GPU"),
    (
        "train",
        ["model.attention_backend=mem_efficient"],
        r"model.attention_backend='mem_efficient' is not valid: this run is on the CPU.*math",
    ),
    (
        "train",
        ["+classifier.label_smoothing=0.1"],
        r"classifier.label_smoothing was renamed to loss.label_smoothing",
    ),
    # Several at once: one message, every problem.
    (
        "train",
        ["seed=abc", "optimizer.lr=0"],
        r"(?s)2 problems in the config.*seed='abc'.*optimizer.lr=0",
    ),
]


@pytest.mark.parametrize(
    ("entry", "overrides", "message"), REFUSED, ids=[" ".join(o) or e for e, o, _ in REFUSED]
)
def test_bad_value_is_refused_with_one_message_and_no_traceback(
    make_cfg, capsys, entry, overrides, message
):
    task = {"train": train, "eval": evaluate, "bench": bench}[entry]
    cfg = make_cfg(*overrides, config_name=entry)
    with pytest.raises(SystemExit) as stopped:
        run_task(task, cfg)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err
    key = overrides[0].lstrip("+").split("=")[0] if overrides else "ckpt_path"
    assert key.split("=")[0] in err or key.startswith("trainer="), "the message names the key"


def test_an_unexpected_exception_is_one_line_naming_where_and_the_traceback_goes_to_the_log(
    make_cfg, capsys, tmp_path, monkeypatch
):
    """The last line of defence: an exception that is not ours, raised before the first step."""

    def broken_load():
        raise RuntimeError("the disk said no")

    # Called by DigitsDataModule.setup: the traceback passes through vitlab/data/digits.py.
    monkeypatch.setattr("vitlab.data.digits.load_digits", broken_load)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as stopped:
            run_task(train, make_cfg("debug=fdr"))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert stopped.value.code == 1
    assert re.search(
        r"Error: RuntimeError: the disk said no \(raised by the code of `data`, digits.py:\d+\)",
        err,
    ), err
    assert "Traceback" not in err
    assert f"the traceback is in {log_file}" in err
    assert "Traceback (most recent call last)" in log_file.read_text()


def test_hydra_full_error_shows_the_traceback(make_cfg, monkeypatch):
    def broken_setup(self, stage=None):
        raise RuntimeError("the disk said no")

    monkeypatch.setattr("vitlab.data.digits.DigitsDataModule.setup", broken_setup)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(RuntimeError, match="the disk said no"):
        run_task(train, make_cfg("debug=fdr"))


def test_pretrained_file_that_does_not_exist_is_named(make_cfg, tmp_path):
    missing = tmp_path / "ViT-B_16.npz"
    with pytest.raises(CheckpointError, match=str(missing)):
        train(make_cfg(f"model.pretrained={missing}", "debug=fdr"))


def test_corrupt_ckpt_path_is_named_before_training(make_cfg, tmp_path):
    corrupt = tmp_path / "last.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ConfigError, match=rf"ckpt_path={corrupt} is not a PyTorch checkpoint"):
        train(make_cfg(f"ckpt_path={corrupt}", "debug=fdr"))


def test_a_renamed_key_in_the_config_is_refused_naming_its_new_name(make_cfg):
    with pytest.raises(
        ConfigError, match=r"classifier.label_smoothing was renamed to loss.label_smoothing"
    ):
        train(make_cfg("+classifier.label_smoothing=0.1"))


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys_that_differ(make_cfg, tmp_path):
    short = ("trainer.max_steps=1", "trainer.limit_val_batches=1", "test=false")
    train(make_cfg(*short, "callbacks.progress_bar=null"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(
        ConfigError,
        match=r"holds a model with hidden_size=64, .*this run's has model.hidden_size=32",
    ):
        train(make_cfg(*short, f"ckpt_path={last}", "model.hidden_size=32", "trainer.max_steps=2"))
    with pytest.raises(ConfigError, match=r"holds a model with .*model.num_layers="):
        evaluate(make_cfg(f"ckpt_path={last}", "model=vit_s16", config_name="eval"))


def test_a_checkpoint_from_before_the_stem_keys_resumes_and_evaluates(make_cfg, tmp_path):
    """Keys added to the model since (stem, patch_norm, resnet_*) count as their defaults."""
    short = ("trainer.max_steps=1", "trainer.limit_val_batches=1", "test=false")
    train(make_cfg(*short, "callbacks.progress_bar=null"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    model = checkpoint["hyper_parameters"]["config"]["model"]
    for key in ("stem", "patch_norm", "resnet_layers", "resnet_width_factor"):
        del model[key]
    torch.save(checkpoint, last)
    train(
        make_cfg(*short, f"ckpt_path={last}", "trainer.max_steps=2", "callbacks.progress_bar=null")
    )
    evaluate(make_cfg(f"ckpt_path={last}", "model=vit_tiny", config_name="eval"))
