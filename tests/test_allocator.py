"""`vitlab.training.allocator`: freed host memory is reused, not faulted in again (a subprocess:
mallopt settings last for the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitlab.runs.tasks import prepare_run

PROBE = """
import json, resource, torch
from vitlab.training.allocator import retain_freed_memory

def faults_of_a_fresh_64mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MB, written: every page touched
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_64mb_tensor()
default = faults_of_a_fresh_64mb_tensor()
taken = retain_freed_memory()
for _ in range(10):  # the heap grows until freed blocks fit again (posix_memalign pads)
    faults_of_a_fresh_64mb_tensor()
retained = faults_of_a_fresh_64mb_tensor()
print(json.dumps({"default": default, "taken": taken, "retained": retained}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_retained_memory_is_reused_without_page_faults():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    faults = json.loads(result.stdout.strip().splitlines()[-1])
    assert faults["taken"], "glibc took both mallopt settings"
    # glibc's default maps a 64 MB block afresh each time: 16k pages (fewer with huge pages)
    assert faults["default"] > 1000, faults
    assert faults["retained"] < faults["default"] / 20, faults


def test_prepare_run_applies_it_only_when_configured(make_cfg, monkeypatch):
    import vitlab.runs.tasks

    calls = []
    monkeypatch.setattr(vitlab.runs.tasks, "retain_freed_memory", lambda: calls.append(1))
    prepare_run(make_cfg("extras.retain_freed_memory=false"))
    assert calls == []
    prepare_run(make_cfg())
    assert calls == [1], "on by default"
