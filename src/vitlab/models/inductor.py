"""Whether `torch.compile`'s default backend, Inductor, can build code for the CPU here.

Inductor writes a CPU graph as C++ and builds it with the machine's C++ compiler (`$CXX`,
else `g++`); where there is none, the first compiled call fails deep inside the compile,
minutes into a run. vitlab asks up front instead: `compile` on a CPU run is refused before
anything is built (`vitlab.runs.validate.check_run`), and the benchmark leaves its
compiled contenders out with a warning rather than failing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

INDUCTOR = "inductor"


def cpu_compiler() -> str | None:
    """The C++ compiler Inductor would build CPU code with; None where it finds none.

    Asks Inductor itself (its search runs `<compiler> --version` once per process), so
    `$CXX` and `torch._inductor.config.cpp.cxx` count as they do in a compile.
    """
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # another torch layout: let the compile itself say what it lacks
        return "unknown"
    try:
        return get_cpp_compiler()
    except InvalidCxxCompiler:
        return None


def uses_inductor(options: Mapping[str, Any]) -> bool:
    """Whether `torch.compile(**options)` compiles with Inductor (its default backend)."""
    return options.get("backend", INDUCTOR) == INDUCTOR


def cpu_compile_problem(options: Mapping[str, Any]) -> str | None:
    """Why `torch.compile(**options)` cannot compile a CPU model here; None if it can."""
    if not uses_inductor(options) or cpu_compiler() is not None:
        return None
    return (
        "torch.compile's inductor backend builds CPU code with a C++ compiler, and none was "
        "found ($CXX, or g++ where CXX is unset): install one (e.g. apt install g++) or point CXX "
        "at one"
    )
