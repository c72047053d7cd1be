"""The schema of a config, read from the code it configures: each key's type, range and choices.

A node with a `_target_` is checked against that class's (or function's) signature:
its parameters are the valid keys, their type hints the valid values; the bounds of
`vitlab.bounds` (`Count`, `Rate`, ...) and `Literal` choices are part of the hints.
A node without one (the top-level keys, `loss`, `extras`, `bench`) is checked
against the dataclass that mirrors it (`vitlab.runs.settings`). So a new argument
is checked as soon as it is declared, with no new code here.

pydantic judges a value against a hint: it already understands unions, `Literal`,
`Annotated` bounds and containers, which a hand-written checker would re-implement.
Scalars are judged strictly (`"abc"`, `"5"` or `true` is not an integer; `2.0` is
not one either); lists are not, so a YAML list fills a `tuple[float, float]`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Interval, Le, Lt
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import ConfigDict, TypeAdapter, ValidationError

MISSING = "???"
# Keys of a `_target_` node that Hydra reads itself.
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


@dataclass(frozen=True)
class Problem:
    """One bad value: its dotted key, the value as given, and what would be valid."""

    key: str
    value: Any
    valid: str

    def __str__(self) -> str:
        return f"{self.key}={self.value!r} is not valid: {self.valid}"


@dataclass(frozen=True)
class Field:
    """One parameter of a constructor: its type hint (`Any` without one) and whether it has a default."""

    hint: Any
    required: bool


@functools.cache
def fields_of(target: Callable[..., Any]) -> tuple[dict[str, Field], bool]:
    """The parameters of a class's constructor (or a function) and whether it takes `**kwargs`."""
    hints = _type_hints(target)
    fields, open_ended = {}, False
    for name, parameter in inspect.signature(target).parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            open_ended = True
        elif parameter.kind is not parameter.VAR_POSITIONAL:
            required = parameter.default is parameter.empty
            fields[name] = Field(hints.get(name, Any), required)
    return fields, open_ended


def _type_hints(target: Callable[..., Any]) -> dict[str, Any]:
    """Resolved hints, from `__init__` for a class (a dataclass's are on the class); {} if unresolvable."""
    candidates = (target.__init__, target) if inspect.isclass(target) else (target,)
    for candidate in candidates:
        try:
            hints = typing.get_type_hints(candidate, include_extras=True)
        except Exception:  # a hint naming what only exists under TYPE_CHECKING
            continue
        if hints:
            return hints
    return {}


def plain(cfg: DictConfig, problems: list[Problem], prefix: str = "") -> dict[str, Any]:
    """The config as plain data, interpolations resolved; a missing (`???`) or unresolvable
    value becomes a `Problem` and is left out, so the rest can still be checked."""
    values: dict[str, Any] = {}
    for name in cfg:
        key = f"{prefix}{name}"
        if OmegaConf.is_missing(cfg, name):
            problems.append(Problem(key, MISSING, f"required: set {key}=<value>"))
            continue
        try:
            value = cfg[name]
            if isinstance(value, DictConfig):
                values[name] = plain(value, problems, f"{key}.")
            elif isinstance(value, ListConfig):
                values[name] = OmegaConf.to_container(value, resolve=True)
            else:
                values[name] = value
        except Exception as err:  # a bad interpolation, a resolver refusing its input
            raw = OmegaConf.to_container(cfg, resolve=False).get(name)
            first_line = str(err).splitlines()[0] if str(err) else ""
            problems.append(
                Problem(key, raw, f"cannot be resolved ({type(err).__name__}: {first_line})")
            )
    return values


def check_node(
    node: Mapping[str, Any],
    key: str,
    problems: list[Problem],
    target: Callable[..., Any] | None = None,
    allowed: Iterable[str] = (),
) -> None:
    """Check every key of `node` against `target`'s parameters (by default its `_target_`).

    `allowed`: keys the runs layer consumes before building (`model.pretrained`).
    Nested `_target_` nodes (a hybrid's `stem`) are checked against their own target.
    """
    if target is None:
        target = _target_of(node, key, problems)
        if target is None:
            return
    fields, open_ended = fields_of(target)
    name_of = getattr(target, "__qualname__", str(target))
    for name, value in node.items():
        if name in HYDRA_KEYS or name in allowed:
            continue
        sub = f"{key}.{name}" if key else name
        if name not in fields:
            if not open_ended:
                valid = ", ".join(f for f in fields if f not in ("self",))
                problems.append(
                    Problem(sub, value, f"{name_of} has no such argument; its arguments: {valid}")
                )
            continue
        if isinstance(value, Mapping) and "_target_" in value:
            check_node(value, sub, problems)
        elif (expected := mismatch(fields[name].hint, value)) is not None:
            problems.append(Problem(sub, value, f"expected {expected}"))


def _target_of(
    node: Mapping[str, Any], key: str, problems: list[Problem]
) -> Callable[..., Any] | None:
    import hydra.utils

    path = node.get("_target_")
    try:
        return hydra.utils.get_object(str(path))
    except Exception as err:
        problems.append(Problem(f"{key}._target_", path, f"cannot be imported ({err})"))
        return None


def mismatch(hint: Any, value: Any) -> str | None:
    """None if `value` fits `hint`; else a description of what would fit."""
    adapter = _adapter(hint)
    if adapter is None:
        return None
    try:
        adapter.validate_python(value, strict=not isinstance(value, (list, tuple, dict)))
    except ValidationError:
        return describe(hint)
    return None


_ADAPTERS: dict[Any, TypeAdapter | None] = {}


def _adapter(hint: Any) -> TypeAdapter | None:
    """pydantic's validator for `hint`, cached; None for no hint or one pydantic cannot check."""
    if hint is Any:
        return None
    try:
        return _ADAPTERS[hint]
    except (KeyError, TypeError):
        pass
    try:
        adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # a forward reference, a protocol pydantic has no schema for
        adapter = None
    with contextlib.suppress(TypeError):  # an unhashable hint is not cached
        _ADAPTERS[hint] = adapter
    return adapter


def describe(hint: Any) -> str:
    """What a hint admits, in the words a config author uses: "an integer >= 1 or null"."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return describe(args[0]) + "".join(_bound(meta) for meta in args[1:])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return _describe_union(args)
    if hint is type(None) or hint is None:
        return "null"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in words:
        return words[hint]
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    if origin in (list, tuple, set, Sequence, Iterable) or hint in (list, tuple):
        return "a list" + (f" of {_plural(describe(args[0]))}" if args else "")
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    return f"a {getattr(hint, '__name__', hint)}"


def _describe_union(args: tuple[Any, ...]) -> str:
    choices = [a for arg in args if get_origin(arg) is Literal for a in get_args(arg)]
    others = [arg for arg in args if get_origin(arg) is not Literal and arg is not type(None)]
    # Classes a YAML value can never be (a Tensor, an Accelerator) say nothing to a config author.
    plain_others = [a for a in others if _is_config_type(a)] or others
    parts = [describe(a) for a in plain_others]
    if choices:
        parts.insert(0, "one of " + ", ".join(repr(a) for a in choices))
    if type(None) in args:
        parts.append("null")
    return " or ".join(dict.fromkeys(parts))


def _is_config_type(hint: Any) -> bool:
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    origin = get_origin(base) or base
    return origin in (bool, int, float, str, list, tuple, dict, set, Sequence, Mapping, Iterable)


def _bound(meta: Any) -> str:
    if isinstance(meta, Interval):
        low = f"[{meta.ge}" if meta.ge is not None else f"({meta.gt}"
        high = f"{meta.le}]" if meta.le is not None else f"{meta.lt})"
        return f" in {low}, {high}"
    for kind, word, field in ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt")):
        if isinstance(meta, kind):
            return f" {word} {getattr(meta, field)}"
    return ""


def _plural(words: str) -> str:
    """ "an integer >= 1" -> "integers >= 1"."""
    for article in ("an ", "a "):
        if words.startswith(article):
            noun, _, rest = words[len(article) :].partition(" ")
            return f"{noun}s {rest}".strip()
    return words
