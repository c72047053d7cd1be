"""Every user mistake stops the run before training with a message naming the key, the value and what is valid."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from vitlab.errors import CheckpointError, ConfigError
from vitlab.runs.tasks import train

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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.num_heads=3", r"hidden_size=64 is not divisible by num_heads=3"),
        ("optimizer.lr=0", r"optimizer.lr=0 is not valid; use a positive number"),
        ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 is not valid"),
        ("optimizer.weight_decay=-1", r"optimizer.weight_decay=-1 is not valid; use a number >= 0"),
        ("trainer.max_steps=0", r"trainer.max_steps=0 is not valid; use a positive number, or -1"),
        ("trainer.max_epochs=0", r"trainer.max_epochs=0 is not valid"),
        ("data.batch_size=0", r"data.batch_size=0 must be a positive integer"),
        ("loss.label_smoothing=1.0", r"label_smoothing=1.0 must be in \[0, 1\)"),
        ("loss.label_smoothing=-0.1", r"label_smoothing=-0.1 must be in \[0, 1\)"),
        ("scheduler.warmup_steps=-5", r"scheduler.warmup_steps=-5 must be >= 0"),
        (
            "scheduler.warmup_steps=100000",
            r"warmup_steps=100000 is more than the \d+ total optimizer steps",
        ),
        (
            "model.attention_backend=mem_efficient",
            r"model.attention_backend='mem_efficient' is not valid; this run is on the CPU.*math",
        ),
        ("resume=yes", r"resume='yes' is not an option; use resume=auto"),
        (
            "trainer.accumulate_grad_batches=3",
            r"data.batch_size=64 .*world size 1 .*accumulate_grad_batches=3 = 3 micro-batches",
        ),
    ],
)
def test_bad_value_is_refused_before_training(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        train(make_cfg(override))


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
