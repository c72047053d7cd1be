"""One validation step for a whole run config, before anything is built: every problem at once.

Three kinds of check, in this order:
- the schema (`vitlab.runs.schema`): every key of every node against the signature
  of the class it configures, or the dataclass that mirrors it (`vitlab.runs.settings`):
  types, the bounds and choices the signatures declare, unknown keys, missing values;
- `RULES`: bounds of third-party arguments whose signatures say only "int" or
  "float" (torch's optimizers, Lightning's Trainer), keyed by their config key;
- cross-key rules: the patch size divides the image (or the stem's map), the heads
  divide the width, the global batch splits over devices x nodes x accumulation, the
  precision and attention kernel exist on this machine, a renamed key is not used.

`check_run` raises one `ConfigError` listing every problem, each naming the key,
the value and what would be valid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vitlab.errors import ConfigError, exit_with
from vitlab.runs import settings
from vitlab.runs.schema import Problem, check_node, plain

GPU_ACCELERATORS = ("gpu", "cuda")
# Lightning also takes 16-true / bf16-true / 64-true; these three are the sweep axis.
CPU_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "64-true")
# The SDPA kernels PyTorch has on the CPU (`model.attention_backend`).
CPU_ATTENTION_BACKENDS = (None, "auto", "math", "flash")
# Config keys that were renamed, old -> new: setting an old one fails, naming the new one.
RENAMED_KEYS = {"classifier.label_smoothing": "loss.label_smoothing"}


def runs_on_cpu(trainer: Mapping[str, Any], gpu_available: bool | None = None) -> bool:
    """Whether a trainer config runs on the CPU: `accelerator: cpu`, or `auto` with no CUDA GPU."""
    import torch  # here, not with the module: vitlab.reports reads is_number and loads no torch

    gpu_available = torch.cuda.is_available() if gpu_available is None else gpu_available
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not gpu_available)


def check_trainer(trainer: Mapping[str, Any], gpu_available: bool | None = None) -> None:
    """Refuse a GPU trainer without a GPU, and a precision the accelerator cannot run.

    Lightning would accept `precision=16-mixed` on the CPU and run something other
    than what the user asked for; we say so instead of running it silently.
    """
    import torch

    gpu_available = torch.cuda.is_available() if gpu_available is None else gpu_available
    accelerator = str(trainer.get("accelerator", "auto"))
    precision = str(trainer.get("precision", "32-true"))
    if accelerator in GPU_ACCELERATORS and not gpu_available:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU; "
            "use trainer=cpu (or trainer.accelerator=cpu), or trainer=default to pick the GPU when there is one"
        )
    on_cpu = runs_on_cpu(trainer, gpu_available)
    if on_cpu and precision not in CPU_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} needs a CUDA GPU (float16 autocast with loss scaling), "
            f"but this run is on the CPU; valid on the CPU: {', '.join(CPU_PRECISIONS)}"
        )
    if (
        not on_cpu
        and gpu_available
        and precision.startswith("bf16")
        and not torch.cuda.is_bf16_supported()
    ):
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU with bfloat16 (Ampere or newer); "
            "use trainer.precision=16-mixed or 32-true on this GPU"
        )


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_renamed_keys(keys: Iterable[str]) -> None:
    """Refuse dotted keys that were renamed (or a node above one: `classifier={...}`), naming the new key."""
    for key in keys:
        for old, new in RENAMED_KEYS.items():
            if key == old or old.startswith(f"{key}."):
                raise ConfigError(f"{old} was renamed to {new}; set {new} instead")


def refuse_renamed_overrides(argv: Sequence[str]) -> None:
    """Exit with status 2 if a command-line override sets a renamed key, naming the new one.

    For the entry points, before `hydra.main`: Hydra would refuse the old key only as
    one it does not know (`Could not override ...`), without the new name.
    """
    keys = [
        arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg and not arg.startswith("-")
    ]
    try:
        check_renamed_keys(keys)
    except ConfigError as err:
        exit_with(err)


@dataclass(frozen=True)
class Rule:
    """A bound that a third-party signature does not declare: `check(value)` and what is valid."""

    check: Callable[[Any], bool]
    valid: str


def _at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}")


def _count_or_unlimited(none_ok: bool) -> Rule:
    words = "a positive number, or -1" + (" (or null)" if none_ok else "") + " for no limit"
    return Rule(lambda v: v is None or v == -1 or v >= 1, f"use {words}")


_POSITIVE = Rule(lambda v: v > 0, "use a positive number, e.g. 1e-3")
_NON_NEGATIVE = Rule(lambda v: v >= 0, "use a number >= 0")
_FRACTION = Rule(lambda v: 0 <= v < 1, "use a number in [0, 1)")
_BATCHES = Rule(
    lambda v: v >= 0 and (isinstance(v, int) or v <= 1),
    "use a fraction in [0, 1] of the split or a whole number of batches >= 0",
)

# Keyed by config key; applied once the value has the type its signature asks for.
RULES: dict[str, Rule] = {
    "optimizer.lr": _POSITIVE,
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.momentum": _FRACTION,
    "optimizer.eps": _POSITIVE,
    "optimizer.betas": Rule(lambda v: all(0 <= b < 1 for b in v), "use two numbers in [0, 1)"),
    # vitlab's, not torch's (CONSUMED): no signature types it, so this rule also refuses text.
    "optimizer.layer_decay": Rule(
        lambda v: v is None or (is_number(v) and 0 < v <= 1),
        "use a number in (0, 1], e.g. 0.75, or null for one learning rate",
    ),
    "trainer.max_epochs": _count_or_unlimited(none_ok=True),
    "trainer.max_steps": _count_or_unlimited(none_ok=False),
    "trainer.accumulate_grad_batches": _at_least(1),
    "trainer.num_nodes": _at_least(1),
    "trainer.devices": Rule(
        lambda v: (v == -1 or v >= 1) if isinstance(v, int) else _device_list(v),
        "use a number of devices >= 1, -1 for all, auto, or GPU indices ([0, 1] or '0,1')",
    ),
    "trainer.log_every_n_steps": _at_least(1),
    "trainer.check_val_every_n_epoch": Rule(lambda v: v is None or v >= 1, "use >= 1 or null"),
    "trainer.gradient_clip_val": Rule(lambda v: v is None or v >= 0, "use a number >= 0 or null"),
    "trainer.gradient_clip_algorithm": Rule(
        lambda v: v in (None, "norm", "value"), "use one of 'norm', 'value' or null"
    ),
    "trainer.accelerator": Rule(
        lambda v: not isinstance(v, str) or v in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
        "use one of 'auto', 'cpu', 'gpu', 'cuda', 'mps', 'tpu'",
    ),
    "trainer.limit_train_batches": _BATCHES,
    "trainer.limit_val_batches": _BATCHES,
    "trainer.limit_test_batches": _BATCHES,
}

# The nodes that configure no class, by entry point (`task_name`), and the dataclass each mirrors.
SETTINGS = {
    "train": settings.TrainSettings,
    "eval": settings.EvalSettings,
    "predict": settings.PredictSettings,
    "export": settings.ExportSettings,
}
NODES = {"loss": settings.Loss, "extras": settings.Extras, "paths": settings.Paths}
# Nodes of `_target_` nodes, one per entry (`callbacks.model_checkpoint`, `logger.csv`).
COLLECTIONS = ("callbacks", "logger")
# Keys of a `_target_` node that the runs layer reads before building it.
CONSUMED = {"model": ("pretrained",), "optimizer": ("layer_decay",)}
# Those keys as dotted keys: no signature types them, so their rule judges every value.
_UNTYPED = {f"{node}.{key}" for node, keys in CONSUMED.items() for key in keys}


def check_run(cfg: Any, gpu_available: bool | None = None) -> None:
    """Check every key of a composed run config and raise one `ConfigError` listing every problem.

    Runs before anything is built (the datamodule, the model, the trainer) and reads
    no files but a resumed checkpoint's config.
    """
    problems: list[Problem | str] = []
    values = plain(cfg, problems) if not isinstance(cfg, dict) else dict(cfg)
    problems += [str(p) for p in _renamed_problems(values)]
    _check_schema(values, problems)
    problems += _rule_problems(values)
    problems += _cross_key_problems(values, gpu_available)
    if problems:
        lines = [str(p) for p in dict.fromkeys(map(str, problems))]
        if len(lines) == 1:
            raise ConfigError(lines[0])
        raise ConfigError(
            f"{len(lines)} problems in the config (nothing was built):\n"
            + "\n".join(f"  - {line}" for line in lines)
        )


def _renamed_problems(values: Mapping[str, Any]) -> list[str]:
    found = []
    for old, new in RENAMED_KEYS.items():
        if _lookup(values, old) is not _ABSENT:
            found.append(f"{old} was renamed to {new}; set {new} instead")
    return found


def _check_schema(values: Mapping[str, Any], problems: list[Any]) -> None:
    task = values.get("task_name")
    top = SETTINGS.get(task, settings.BenchRunSettings if task == "bench" else None)
    groups = {}
    for name, node in values.items():
        if not isinstance(node, Mapping):
            continue
        groups[name] = node
        if name in NODES:
            check_node(node, name, problems, target=NODES[name])
        elif name == "bench":
            from vitlab.bench.race import BenchSettings

            check_node(node, name, problems, target=BenchSettings)
        elif name in COLLECTIONS:
            for entry, child in node.items():
                if isinstance(child, Mapping) and "_target_" in child:
                    check_node(child, f"{name}.{entry}", problems)
        elif "_target_" in node:
            check_node(node, name, problems, allowed=CONSUMED.get(name, ()))
    if top is not None:
        scalars = {k: v for k, v in values.items() if k not in groups and k != "hydra"}
        check_node(scalars, "", problems, target=top)


_ABSENT = object()


def _lookup(values: Mapping[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _rule_problems(values: Mapping[str, Any]) -> list[str]:
    found = []
    for key, rule in RULES.items():
        value = _lookup(values, key)
        if value is _ABSENT or (key not in _UNTYPED and not _fits_rule_type(value)):
            continue  # absent, or already refused by its type
        try:
            ok = rule.check(value)
        except TypeError:  # a value of a type the signature allows but the rule does not judge
            continue
        if not ok:
            found.append(str(Problem(key, value, rule.valid)))
    return found


def _device_list(value: Any) -> bool:
    """auto, or device indices as Lightning takes them: [0, 1] or "0,1"."""
    if isinstance(value, list):
        return all(isinstance(v, int) and v >= 0 for v in value)
    return value == "auto" or all(part.strip().isdigit() for part in str(value).split(","))


def _fits_rule_type(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(is_number(v) for v in value)
    return value is None or is_number(value) or isinstance(value, str)


def _cross_key_problems(values: Mapping[str, Any], gpu_available: bool | None) -> list[str]:
    model = values.get("model") or {}
    data = values.get("data") or {}
    trainer = values.get("trainer") or {}
    found = [
        *_patch_problems(model),
        *_dynamic_patch_problems(model),
        *_head_problems(model),
        *_batch_problems(data, trainer),
        *_fold_problems(data),
    ]
    try:
        check_trainer(trainer, gpu_available)
    except ConfigError as err:
        found.append(str(err))
    devices = trainer.get("devices", 1)
    if runs_on_cpu(trainer, gpu_available) and not (devices == "auto" or _ints(devices)):
        found.append(
            str(Problem("trainer.devices", devices, "on the CPU use a number of processes >= 1"))
        )
    found += _compile_problems(values.get("compile"), trainer, gpu_available)
    backend = model.get("attention_backend")
    if (
        isinstance(trainer.get("accelerator", "auto"), str)
        and runs_on_cpu(trainer, gpu_available)
        and backend not in CPU_ATTENTION_BACKENDS
    ):
        found.append(
            str(
                Problem(
                    "model.attention_backend",
                    backend,
                    "this run is on the CPU, which has only the auto, math and flash kernels",
                )
            )
        )
    return found


def _compile_problems(
    value: Any, trainer: Mapping[str, Any], gpu_available: bool | None
) -> list[str]:
    """`compile` on a CPU run needs what Inductor builds CPU code with (`models.inductor`)."""
    if not value or not isinstance(value, (bool, Mapping)):
        return []  # eager, or a type the schema refuses
    if not runs_on_cpu(trainer, gpu_available):
        return []
    from vitlab.models.inductor import cpu_compile_problem

    problem = cpu_compile_problem({} if value is True else value)
    return (
        [] if problem is None else [str(Problem("compile", value, f"{problem}; or compile=false"))]
    )


def _ints(*values: Any) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _patch_problems(
    model: Mapping[str, Any], patch_size: Any = _ABSENT, where: str | None = None
) -> list[str]:
    """The stem can make the patches (`stems.stem_patch_problem`), and they tile the image,
    or the ResNet stem's feature map of it (`layers.patch_grid`). `patch_size`: another
    size than the model's to check (a FlexiViT size), reported as `where` (`key=value`)."""
    from vitlab.models.layers import patch_grid
    from vitlab.models.stems import stem_patch_problem

    image_size = model.get("image_size")
    patch_size = model.get("patch_size") if patch_size is _ABSENT else patch_size
    where = where or f"model.patch_size={patch_size}"
    stem = model.get("stem")
    stride = _stem_stride(model)
    if not _ints(image_size, patch_size) or stride == 0:
        return []
    if problem := stem_patch_problem(stem, patch_size):
        return [f"{where} is not valid: {problem}"]
    try:
        patch_grid(image_size, patch_size, stride)
    except ValueError as err:
        return [f"{where} is not valid: {err}"]
    return []


def _dynamic_patch_problems(model: Mapping[str, Any]) -> list[str]:
    """Each FlexiViT size tiles the image as `patch_size` must; token merging and PatchDropout
    change the token set, which CPVT's PEG (the grid after block 0) and rope2d (each
    token's place) cannot follow (`patch_dropout.NEEDS_EVERY_TOKEN`)."""
    from vitlab.models.patch_dropout import token_set_problem

    found = []
    sizes = model.get("flexi_patch_sizes")
    if isinstance(sizes, (list, tuple)):
        if not sizes:
            found.append(
                str(Problem("model.flexi_patch_sizes", sizes, "give patch sizes, or null for off"))
            )
        for size in sizes:
            found += _patch_problems(model, size, f"model.flexi_patch_sizes={sizes}")
            patch_size = model.get("patch_size")
            if model.get("stem") == "conv" and _ints(size, patch_size) and size % patch_size:
                found.append(
                    f"model.flexi_patch_sizes={sizes} is not valid: the conv stem is built for "
                    f"patch_size={patch_size} and stays as it is at every patch size, so each "
                    f"size must be a multiple of {patch_size}"
                )
    pos_embed = model.get("pos_embed")
    for key in ("token_merging", "patch_dropout"):
        value = model.get(key)
        problem = (
            token_set_problem(key, value, pos_embed, prefix="model.")
            if is_number(value) and isinstance(pos_embed, str)
            else None
        )
        if problem:
            found.append(problem)
    return found


def _stem_stride(model: Mapping[str, Any]) -> int | None:
    """The stride of the map whose cells `patch_size` counts: a ResNet stem's; None where the
    patches are in pixels (no stem, conv, patchify_ln); 0 where a bad value hides it (the
    schema reports that value)."""
    import hydra.utils

    from vitlab.models.resnet import ResNetV2
    from vitlab.models.stems import RESNET_LAYERS

    stem = model.get("stem")
    try:
        if stem == "resnet":
            layers = model.get("resnet_layers", RESNET_LAYERS)
            return ResNetV2.stride_of(layers) if isinstance(layers, (list, tuple)) else 0
        if isinstance(stem, Mapping):  # a `_target_` node, as runs saved before `stem: resnet`
            stride_of = hydra.utils.get_object(str(stem.get("_target_"))).stride_of
            return stride_of(**{k: v for k, v in stem.items() if k == "num_layers"})
    except Exception:  # no such class (refused by the schema), or a stem without `stride_of`
        return 0
    return None


def patch_size_change_problem(saved: Mapping[str, Any], model: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's model (`saved`) cannot be evaluated at `model`'s other patch size, or None.

    FlexiViT's resampling (`vitlab.models.flexi`) resizes a ViT's patch kernel and
    position table; a Mixer's or gMLP's token-mixing weights are sized by the token
    count, and a pixel stem (conv, patchify_ln) is built for its patch size.
    """
    old, new = saved.get("patch_size"), model.get("patch_size")
    if old == new or new is None:
        return None
    target = str(saved.get("_target_", ""))
    stem = saved.get("stem", "patch")
    if target.endswith("VisionTransformer") and stem not in ("conv", "patchify_ln"):
        return None
    what = f"stem={stem}" if target.endswith("VisionTransformer") else target.rsplit(".", 1)[-1]
    return (
        f"model.patch_size={new} is not valid: the checkpoint's model ({what}) was trained at "
        f"patch_size={old} and cannot run at another; FlexiViT's resampling works for ViTs "
        "and hybrids (stem patch or resnet)"
    )


def _head_problems(model: Mapping[str, Any]) -> list[str]:
    width, heads = model.get("hidden_size"), model.get("num_heads")
    if _ints(width, heads) and width % heads:
        valid = [h for h in range(1, width + 1) if width % h == 0]
        return [
            f"model.num_heads={heads} is not valid: hidden_size={width} is not divisible by "
            f"num_heads={heads}; head counts that divide it: {valid}"
        ]
    return []


def _fold_problems(data: Mapping[str, Any]) -> list[str]:
    """`data.fold` names a fold of `data.num_folds` (`vitlab.data.folds.fold_problem`); a bad
    type or bound alone is the schema's to report."""
    from vitlab.data.folds import fold_problem

    num_folds, fold = data.get("num_folds"), data.get("fold", 0)
    if not (fold == 0 or _ints(fold)) or not (
        num_folds is None or (_ints(num_folds) and num_folds >= 2)
    ):
        return []
    problem = fold_problem(num_folds, fold)
    return [problem] if problem else []


def _batch_problems(data: Mapping[str, Any], trainer: Mapping[str, Any]) -> list[str]:
    """The global batch splits over devices x nodes x accumulation (`ImageDataModule`'s rule)."""
    from vitlab.data.base import batch_split_problem

    devices = trainer.get("devices", 1)
    devices = len(devices) if isinstance(devices, list) else devices
    if str(devices) == "auto":
        devices = 1 if runs_on_cpu(trainer) else None
    batch = data.get("batch_size")
    nodes = trainer.get("num_nodes", 1)
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if not _ints(batch, devices, nodes, accumulate):
        return []  # refused by type or range already, or a device count known only later
    problem = batch_split_problem(batch, devices * nodes, accumulate)
    return [problem] if problem else []
