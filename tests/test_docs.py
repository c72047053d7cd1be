"""The documentation builds, and every command it shows runs as written.

A command is checked without running it. A `src/train.py`, `src/eval.py` or `src/bench.py`
command is composed with Hydra's compose API: every group, option and key must exist, and
the config must resolve; a multirun is composed once per option of each swept group, its
swept fields (the sweep config's own axes included) with their first value. `make X` must
be a Makefile target, and a `src/compare.py` command must parse with that script's flags.
The conventions (which blocks are checked, `$name` variables) are stated on the docs' home
page, `docs/index.md`.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override
from omegaconf import DictConfig, OmegaConf, open_dict

from vitlab.runs.folders import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Fenced blocks in these languages hold commands to type; `text` blocks are output or
# illustration. Every fenced block must name its language, so none is skipped by omission.
COMMAND_LANGUAGES = {"bash", "sh"}
PROSE_LANGUAGES = {"text", "python", "yaml"}
# The entry points whose commands are composed, and the config each composes.
ENTRY_CONFIGS = {"train.py": "train", "eval.py": "eval", "bench.py": "bench"}
# `make X ARGS="..."`: the targets whose ARGS are overrides of an entry point's config.
MAKE_CONFIGS = {"train": "train", "bench": "bench"}
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
HYDRA_FLAGS = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--resolve", "--info"}
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}

FENCE = re.compile(r"^(?P<indent> *)```(?P<language>\S*)\s*$")
INLINE_CODE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\n))+)`(?!`)")
ASSIGNMENT = re.compile(r"^(?P<name>[A-Za-z_]\w*)=")
VARIABLE = re.compile(r"\$\{?(?P<name>[A-Za-z_]\w*)\}?")
SCRIPT = re.compile(r"(?:^|/)src/(?P<script>train|eval|bench|compare)\.py$")


@dataclass(frozen=True)
class Command:
    """One command of the docs: where it is, and its words after the shell's quoting."""

    where: str
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


@dataclass(frozen=True)
class CodeBlock:
    """A fenced block: the file and line of its opening fence, its language and its lines."""

    where: str
    language: str
    lines: tuple[str, ...]


def code_blocks(path: Path) -> tuple[list[CodeBlock], str]:
    """The fenced blocks of a Markdown file, and its text outside them."""
    blocks, prose = [], []
    lines = path.read_text().splitlines()
    n = 0
    while n < len(lines):
        opening = FENCE.match(lines[n])
        if not opening:
            prose.append(lines[n])
            n += 1
            continue
        start, body = n, []
        n += 1
        while n < len(lines) and not FENCE.match(lines[n]):
            body.append(lines[n].removeprefix(opening["indent"]))
            n += 1
        n += 1  # the closing fence
        where = f"{path.relative_to(ROOT)}:{start + 1}"
        blocks.append(CodeBlock(where, opening["language"], tuple(body)))
    return blocks, "\n".join(prose)


def shell_lines(block: CodeBlock) -> Iterator[tuple[str, str]]:
    """(where, line) for each logical line of a shell block, continuations joined."""
    pending, first = "", 0
    for offset, line in enumerate(block.lines):
        if not pending:
            first = offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        path, start = block.where.rsplit(":", 1)
        yield f"{path}:{int(start) + 1 + first}", line


def block_commands(block: CodeBlock) -> Iterator[Command]:
    """The commands of a shell block, with each `$name` replaced by a stand-in path.

    A variable must be set by an earlier line of the same block (`run=$(ls -d ... | tail -n 1)`),
    so that the block runs as written once the runs it looks for exist.
    """
    assigned: set[str] = set()
    for where, line in shell_lines(block):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assignment = ASSIGNMENT.match(words[0])
        if assignment and not any(SCRIPT.search(w) or w == "make" for w in words):
            assigned.add(assignment["name"])
            continue
        for segment in split_on_separators(words):
            argv = []
            for word in segment:
                for name in VARIABLE.findall(word):
                    assert name in assigned, f"{where}: ${name} is not set by an earlier line"
                argv.append(VARIABLE.sub(lambda m: f"docs_{m['name']}", word))
            yield Command(where, tuple(argv))


def split_on_separators(words: list[str]) -> Iterator[list[str]]:
    """`a && b; c | d` -> [a], [b], [c], [d]."""
    segment: list[str] = []
    for word in [*words, ";"]:
        if word in SHELL_SEPARATORS:
            if segment:
                yield segment
            segment = []
        else:
            segment.append(word)


def documented_commands() -> list[Command]:
    """Every command of the README and docs: in `bash`/`sh` blocks, and inline code that
    starts with `python src/` or `make `."""
    commands = []
    for path in DOC_FILES:
        blocks, prose = code_blocks(path)
        for block in blocks:
            assert block.language, f"{block.where}: a fenced block must name its language"
            assert block.language in COMMAND_LANGUAGES | PROSE_LANGUAGES, (
                f"{block.where}: unknown block language {block.language!r}"
            )
            if block.language in COMMAND_LANGUAGES:
                commands.extend(block_commands(block))
        for span in (" ".join(s.split()) for s in INLINE_CODE.findall(prose)):
            if span.startswith(("python src/", "make ")):
                where = f"{path.relative_to(ROOT)} (inline)"
                assert "$" not in span, f"{where}: {span} uses a variable outside a block"
                commands.append(Command(where, tuple(shlex.split(span))))
    return commands


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


@functools.cache
def compose_command_config(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """The config `src/<config_name>.py overrides...` composes, the `hydra` node included.

    Needs the Hydra context of the `hydra_context` fixture; several commands share a
    combination, so each is composed once.
    """
    return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


def resolve_run_config(cfg: DictConfig) -> None:
    """Resolve every interpolation outside `hydra`, the run's output folder stood in for."""
    HydraConfig.instance().set_config(cfg)
    try:
        run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        with open_dict(run_cfg):
            run_cfg.paths.output_dir = "docs_output"
        OmegaConf.to_container(run_cfg, resolve=True, throw_on_missing=True)
    finally:
        HydraConfig.instance().cfg = None


def sweep_values(override: Override) -> list[str]:
    """The overrides that stand for a swept one: `group=a,b` -> [`group=a`, `group=b`].

    A swept field gives its first value (an interval sweep, Optuna's, its start): any
    value composes the same, while each option of a group is a config file of its own.
    """
    if not override.is_sweep_override():
        return [override.input_line]
    key = override.get_key_element()
    value = override.value()
    if isinstance(value, IntervalSweep):
        return [f"{key}={value.start}"]
    values = [f"{key}={v}" for v in override.sweep_string_iterator()]
    return values if (CONF_DIR / override.key_or_group).is_dir() else values[:1]


def one_at_a_time(axes: list[list[str]]) -> list[list[str]]:
    """The first value of every axis, then each other value of each axis with the others first."""
    first = [values[0] for values in axes]
    combinations = [first]
    for n, values in enumerate(axes):
        combinations += [[*first[:n], value, *first[n + 1 :]] for value in values[1:]]
    return combinations


def check_composes(config_name: str, args: list[str]) -> None:
    """Compose and resolve the command's config; with `-m`, once per option of each swept group."""
    multirun, overrides, package = False, [], None
    words = iter(args)
    for word in words:
        if word in HYDRA_FLAGS_WITH_VALUE:
            value = next(words)
            if word in ("--cfg", "-c"):
                assert value in ("job", "hydra", "all"), f"--cfg {value}: not job, hydra or all"
            else:
                package = value
        elif word.startswith("-"):
            assert word in HYDRA_FLAGS, f"unknown flag {word}"
            multirun = multirun or word in ("-m", "--multirun")
        else:
            overrides.append(word)
    parsed = OverridesParser.create().parse_overrides(overrides)
    assert multirun or not any(o.is_sweep_override() for o in parsed), "a sweep needs -m"
    axes = [sweep_values(o) for o in parsed]
    first = compose_command_config(config_name, tuple(values[0] for values in axes))
    given = {o.key_or_group for o in parsed}
    params = OmegaConf.select(first, "hydra.sweeper.params") or {}
    swept = [f"{k}={v}" for k, v in params.items() if k not in given] if multirun else []
    axes += [sweep_values(o) for o in OverridesParser.create().parse_overrides(swept)]
    for combination in one_at_a_time(axes):
        cfg = compose_command_config(config_name, tuple(combination))
        resolve_run_config(cfg)
        if package is not None:
            assert OmegaConf.select(cfg, package) is not None, f"--package {package}: no such node"


def load_compare_script() -> ModuleType:
    """`src/compare.py` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("compare", ROOT / "src" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_command(command: Command, targets: set[str], compare_script: ModuleType) -> None:
    """Fail with the command's place in the docs when it would not run as written."""
    argv = list(command.argv)
    while argv and ASSIGNMENT.match(argv[0]):  # environment variables: `WANDB_MODE=offline ...`
        argv.pop(0)
    if argv[:1] == ["make"]:
        variables = dict(w.split("=", 1) for w in argv[1:] if "=" in w)
        for target in (w for w in argv[1:] if "=" not in w):
            assert target in targets, f"no Makefile target {target!r}"
            if target in MAKE_CONFIGS:
                overrides = shlex.split(variables.get("ARGS", ""))
                check_composes(MAKE_CONFIGS[target], overrides)
        return
    script = next((n for n, w in enumerate(argv) if SCRIPT.search(w)), None)
    if script is None:
        return  # another program (tensorboard, wandb, ...): not ours to check
    name, args = Path(argv[script]).name, argv[script + 1 :]
    if name == "compare.py":
        try:
            compare_script.parse_args(args)
        except SystemExit as exit_:
            raise AssertionError(f"src/compare.py refuses these arguments (exit {exit_})") from None
        return
    check_composes(ENTRY_CONFIGS[name], args)


@pytest.fixture(scope="module", autouse=True)
def hydra_context() -> Iterator[None]:
    """The resolvers the configs name, and one Hydra context on `conf/` for every compose."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    compose_command_config.cache_clear()


def test_the_docs_build_in_strict_mode(tmp_path: Path) -> None:
    """A broken link or anchor, or a page missing from `nav`, is a warning: strict fails on it."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").is_file()


def test_the_readme_is_a_front_page_that_links_to_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"the README does not link docs/{page.name}"


@pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema")
def test_every_command_shown_in_the_docs_runs_as_written() -> None:
    commands = documented_commands()
    assert len(commands) > 50  # the extraction found the blocks
    targets = makefile_targets()
    compare_script = load_compare_script()
    failures = []
    for command in commands:
        try:
            check_command(command, targets, compare_script)
        except Exception as err:  # Hydra's composition errors as much as our assertions
            first_line = next(iter(str(err).splitlines()), "")
            failures.append(f"{command}\n    {type(err).__name__}: {first_line}")
    assert not failures, "\n".join(failures)
