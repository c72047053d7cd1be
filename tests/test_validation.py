"""The validation step (`vitlab.runs.validate.check_run`): every shipped config passes it, and a
wrong-typed value of any numeric key of any group is refused by name. Both lists are generated
from conf/ and the schema, so a new option or a new key is covered with no new test."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIG_GROUPS, config_options
from vitlab.errors import ConfigError
from vitlab.runs.validate import check_run, patch_size_change_problem

# Every pickable group but sweep (a sweep is a multirun, checked by tests/test_sweep.py).
GROUPS = [group for group in CONFIG_GROUPS if group != "sweep"]
# The nodes whose numeric keys the generated test mutates; `bench` only in bench.yaml.
NODES = [
    "model",
    "data",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "loss",
    "bench",
]


def _gpu_trainer(cfg) -> bool:
    return str(cfg.trainer.get("accelerator")) in ("gpu", "cuda")


@pytest.mark.parametrize("config_name", ["train", "bench"])
def test_the_entry_points_defaults_pass_validation(make_cfg, config_name):
    check_run(make_cfg(config_name=config_name))


def numeric_keys(node: Any, prefix: str) -> Iterator[str]:
    """Every dotted key under `node` whose value is a number (not a bool)."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            yield from numeric_keys(value, f"{prefix}.{name}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix


PICKS = [("train", f"{g}={o}") for g in GROUPS for o in config_options(g)] + [
    ("bench", "trainer=default")
]
# Lightning takes a list of GPU indices for `trainer.devices`: on a GPU trainer a list is valid.
LIST_VALID_ON_GPU = {"trainer.devices"}


def _changed_keys(plain: Mapping[str, Any], default: Mapping[str, Any]) -> list[str]:
    """The numeric keys whose value differs from the default config's (what an experiment sets)."""
    keys = []
    for node in NODES:
        for key in numeric_keys(plain.get(node), node):
            if _get(plain, key) != _get(default, key):
                keys.append(key)
    return keys


def _get(values: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, Mapping) else None
    return values


@pytest.mark.parametrize(("config_name", "pick"), PICKS, ids=[f"{c}:{p}" for c, p in PICKS])
def test_each_option_passes_and_a_wrong_typed_number_in_it_is_refused_by_name(
    make_cfg, config_name, pick, monkeypatch
):
    """The option as shipped passes; every numeric key it sets, as a word and as a list, is refused by name.

    A group's option is checked on its own node's keys (`model=vit_b16`: every `model.*`);
    an experiment or debug preset on the keys it changes; bench on all of its config.
    """
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: True)
    fixed = ("data.image_size=224", "data.num_classes=10")
    base = make_cfg(pick, *fixed, config_name=config_name)
    gpu = True if _gpu_trainer(base) else None
    plain = OmegaConf.to_container(base, resolve=True)
    group = pick.split("=")[0]
    if config_name == "bench":
        keys = [key for node in NODES for key in numeric_keys(plain.get(node), node)]
    elif group in NODES:
        keys = list(numeric_keys(plain[group], group))
    else:
        default = OmegaConf.to_container(make_cfg(*fixed), resolve=True)
        keys = _changed_keys(plain, default)
    check_run(copy.deepcopy(plain), gpu_available=gpu)  # as shipped: no problem
    accepted = []
    for key in keys:
        for wrong in ("abc", [1, 2]):
            if isinstance(wrong, list) and gpu and key in LIST_VALID_ON_GPU:
                continue
            values = copy.deepcopy(plain)
            *path, last = key.split(".")
            _get(values, ".".join(path))[last] = wrong
            try:
                check_run(values, gpu_available=gpu)
            except ConfigError as err:
                if not re.search(rf"(?m)^(  - )?{re.escape(key)}=", str(err)):
                    accepted.append(f"{key}={wrong!r}: refused without naming the key: {err}")
            else:
                accepted.append(f"{key}={wrong!r}")
    assert not accepted, "accepted or refused without naming the key:\n" + "\n".join(accepted)


def test_every_problem_is_reported_at_once(make_cfg):
    cfg = make_cfg(
        "seed=abc", "compile=banana", "trainer.accumulate_grad_batches=0", "model.num_heads=3"
    )
    with pytest.raises(ConfigError) as refused:
        check_run(cfg)
    message = str(refused.value)
    assert message.startswith("4 problems in the config")
    for key in (
        "seed='abc'",
        "compile='banana'",
        "trainer.accumulate_grad_batches=0",
        "model.num_heads=3",
    ):
        assert f"  - {key} is not valid" in message


VIT = "vitlab.models.VisionTransformer"


@pytest.mark.parametrize(
    ("saved", "refused"),
    [
        ({"_target_": VIT, "patch_size": 4}, None),
        ({"_target_": VIT, "patch_size": 4, "stem": "resnet"}, None),
        (
            {"_target_": VIT, "patch_size": 4, "stem": "conv"},
            r"\(stem=conv\) was trained at patch_size=4",
        ),
        ({"_target_": "vitlab.models.MlpMixer", "patch_size": 4}, r"\(MlpMixer\) was trained at"),
        ({"_target_": "vitlab.models.GMlp", "patch_size": 4}, r"\(GMlp\) was trained at"),
    ],
)
def test_only_vits_and_hybrids_are_evaluated_at_another_patch_size(saved, refused):
    problem = patch_size_change_problem(saved, {**saved, "patch_size": 8})
    assert (problem is None) if refused is None else re.search(refused, problem)
    assert patch_size_change_problem(saved, saved) is None
