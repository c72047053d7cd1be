"""`vitlab.models.kernel_choice`: the speed path is chosen by a measurement, once per machine.

A fake clock stands in for the timer, so each test knows which candidate is
faster; no test depends on how fast this machine is.
"""

from __future__ import annotations

import json

import pytest

from vitlab.models import kernel_choice
from vitlab.models.kernel_choice import MARGIN, choose, fastest, measure


class FakeClock:
    """A timer whose time moves only when a candidate runs, by that candidate's cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def candidates(self, **costs: float):
        """A factory of candidates taking `costs[name]` seconds each; it counts its builds."""
        self.builds = 0

        def build():
            self.builds += 1
            return {name: (lambda name=name: self._run(name, costs[name])) for name in costs}

        return build

    def _run(self, name: str, cost: float) -> None:
        self.calls.append(name)
        self.now += cost


@pytest.fixture(autouse=True)
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "kernels.json"
    monkeypatch.setenv("VITLAB_KERNEL_CACHE", str(path))
    kernel_choice.forget()
    yield path
    kernel_choice.forget()


def test_the_faster_candidate_is_chosen_and_cached_per_machine_and_kernel(cache_file):
    clock = FakeClock()
    build = clock.candidates(plain=2.0, fused=1.0)
    assert choose("k/8x16", build, "plain", timer=clock) == "fused"
    content = json.loads(cache_file.read_text())
    entry = content[kernel_choice.machine_key()]["k/8x16"]
    assert entry == {"choice": "fused", "seconds": {"plain": 2.0, "fused": 1.0}}
    # asked again in this process: no second measurement
    assert choose("k/8x16", build, "plain", timer=clock) == "fused"
    assert clock.builds == 1
    # another process on the same machine reads the file instead of measuring
    kernel_choice.forget()
    assert choose("k/8x16", build, "plain", timer=clock) == "fused"
    assert clock.builds == 1


def test_chosen_reads_a_choice_without_ever_measuring(cache_file):
    """What code that cannot time anything (a graph being traced) asks: the choice made so
    far in this process or the file, else None."""
    clock = FakeClock()
    assert kernel_choice.chosen("k") is None
    assert not cache_file.exists(), "asking measured nothing and wrote nothing"
    choose("k", clock.candidates(plain=2.0, fused=1.0), "plain", timer=clock)
    assert kernel_choice.chosen("k") == "fused"
    kernel_choice.forget()
    assert kernel_choice.chosen("k") == "fused", "read back from the file"
    assert kernel_choice.chosen("other") is None


def test_the_plain_formulation_stays_unless_the_other_wins_by_the_margin():
    clock = FakeClock()
    slightly = 2.0 * (1 - MARGIN / 2)
    assert choose("k", clock.candidates(plain=2.0, fused=slightly), "plain", timer=clock) == "plain"
    assert choose("k2", clock.candidates(plain=1.0, fused=3.0), "plain", timer=clock) == "plain"
    assert fastest({"plain": 1.0, "a": 0.5, "b": 0.4}, "plain") == "b"


def test_each_candidate_runs_once_untimed_then_interleaved():
    clock = FakeClock()
    seconds = measure(clock.candidates(a=1.0, b=3.0)(), timer=clock)
    assert seconds == {"a": 1.0, "b": 3.0}
    reps = kernel_choice.REPEATS
    assert clock.calls == ["a", "b"] + ["a", "b"] * reps


def test_a_median_is_kept_so_one_slow_call_does_not_decide():
    clock, costs = (
        FakeClock(),
        iter([0, 0, 9, 1, 1, 2, 1, 2, 1, 2, 1, 2]),
    )  # a's first timed call stalls
    candidates = {name: lambda: setattr(clock, "now", clock.now + next(costs)) for name in "ab"}
    assert measure(candidates, timer=clock) == {"a": 1, "b": 2}


def test_another_machine_measures_again_and_both_choices_are_kept(cache_file, monkeypatch):
    clock = FakeClock()
    assert choose("k", clock.candidates(plain=2.0, fused=1.0), "plain", timer=clock) == "fused"
    monkeypatch.setattr(kernel_choice, "machine_key", lambda: "another CPU [avx512f]")
    assert choose("k", clock.candidates(plain=1.0, fused=2.0), "plain", timer=clock) == "plain"
    content = json.loads(cache_file.read_text())
    assert len(content) == 2
    assert content["another CPU [avx512f]"]["k"]["choice"] == "plain"


def test_the_machine_key_names_the_cpu_its_instruction_sets_threads_and_torch(monkeypatch):
    import torch

    key = kernel_choice.machine_key()
    assert f"torch={torch.__version__}" in key and f"threads={torch.get_num_threads()}" in key
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert "threads=97" in kernel_choice.machine_key(), "a measurement holds for its thread count"


def test_two_cpus_that_share_a_masked_model_name_get_their_own_choices():
    """A virtual machine's "AMD EPYC" may be a Zen 1 or a Zen 3: the family tells them apart."""
    zen = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: 1\n"
    zen += "model name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n"
    zen1 = kernel_choice.describe_processor(zen.format(family=23))
    zen3 = kernel_choice.describe_processor(zen.format(family=25))
    assert zen1 != zen3
    assert zen1 == "AMD EPYC (cpu family 23, model 1) [avx2]"
    arm = kernel_choice.describe_processor("processor\t: 0\nFeatures\t: fp asimd\n")
    assert arm.endswith("[asimd]") and "family" not in arm


def test_a_broken_or_unwritable_cache_costs_only_a_measurement(cache_file, tmp_path, monkeypatch):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    clock = FakeClock()
    assert choose("k", clock.candidates(plain=2.0, fused=1.0), "plain", timer=clock) == "fused"
    assert json.loads(cache_file.read_text())[kernel_choice.machine_key()]["k"]["choice"] == "fused"
    kernel_choice.forget()
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("VITLAB_KERNEL_CACHE", str(blocked / "kernels.json"))  # under a file
    assert choose("k", clock.candidates(plain=1.0, fused=2.0), "plain", timer=clock) == "plain"


def test_the_default_cache_is_in_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("VITLAB_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_choice.cache_path() == tmp_path / "vitlab" / "kernels.json"
