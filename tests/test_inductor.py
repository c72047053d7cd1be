"""`vitlab.models.inductor`: whether torch.compile's Inductor can build CPU code here, asked
before a run compiles (a missing C++ compiler would fail the first compiled call instead)."""

from __future__ import annotations

import pytest
import torch._inductor.config

from vitlab.errors import ConfigError
from vitlab.models.inductor import cpu_compile_problem, cpu_compiler, uses_inductor
from vitlab.runs.validate import check_run

MISSING = (None, "/no/such/c++")


@pytest.fixture
def no_cpp_compiler():
    """Inductor's own search, pointed at a compiler that does not exist."""
    with torch._inductor.config.patch({"cpp.cxx": MISSING}):
        yield


def test_the_compiler_inductor_would_use_is_found_here():
    """This machine compiles (the benchmark's tests run real compiles)."""
    assert cpu_compiler()
    assert cpu_compile_problem({}) is None


def test_no_compiler_is_no_compiler_and_a_problem_for_inductor_only(no_cpp_compiler):
    assert cpu_compiler() is None
    assert "none was found ($CXX, or g++ where CXX is unset)" in cpu_compile_problem({})
    assert cpu_compile_problem({"mode": "reduce-overhead"}) is not None
    assert cpu_compile_problem({"backend": "aot_eager"}) is None


def test_inductor_is_the_default_backend():
    assert uses_inductor({}) and uses_inductor({"backend": "inductor", "fullgraph": True})
    assert not uses_inductor({"backend": "eager"})


def test_compile_on_the_cpu_without_a_compiler_is_refused_before_anything_is_built(
    make_cfg, no_cpp_compiler
):
    with pytest.raises(
        ConfigError,
        match=r"compile=True is not valid: torch.compile's inductor backend builds CPU code with "
        r"a C\+\+ compiler, and none was found .*; or compile=false",
    ):
        check_run(make_cfg("compile=true", "trainer.accelerator=cpu"))


def test_compile_without_a_compiler_is_refused_only_where_it_would_need_one(
    make_cfg, no_cpp_compiler
):
    check_run(make_cfg("compile={backend: aot_eager}", "trainer.accelerator=cpu"))
    check_run(make_cfg("compile=false", "trainer.accelerator=cpu"))
    check_run(make_cfg("compile=true", "trainer.accelerator=gpu"), gpu_available=True)
