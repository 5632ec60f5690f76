"""Core claims of CPU fitting actors (ray_jobs/cpu_slots.py): distinct cores per claimant, released with the
process, threads bound to the claimed cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ray_jobs import cpu_slots

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux CPU affinity and at least 2 usable cores")


@pytest.fixture
def slots(tmp_path):
    yield str(tmp_path / "slots")
    cpu_slots.release_all()


def test_claims_are_distinct_until_released(slots):
    allowed = sorted(os.sched_getaffinity(0))
    first = cpu_slots.claim_cpus(1, slots)
    second = cpu_slots.claim_cpus(1, slots)
    assert first and second and len(first) == len(second) == 1
    assert first != second and first | second <= set(allowed)
    assert cpu_slots.claim_cpus(len(allowed), slots) is None  # every core: nothing to gain, nothing claimed
    if len(allowed) == 2:
        assert cpu_slots.claim_cpus(1, slots) is None  # both cores are held
    cpu_slots.release_all()
    assert cpu_slots.claim_cpus(1, slots) == first  # free again, lowest core first


def test_a_killed_claimant_gives_its_core_back(slots):
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import json, time; from ray_jobs import cpu_slots; "
         f"print(json.dumps(sorted(cpu_slots.claim_cpus(1, {slots!r}))), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        held = json.loads(child.stdout.readline())  # e.g. [0]
        assert len(held) == 1
        mine = cpu_slots.claim_cpus(1, slots)
        assert mine and held[0] not in mine
        cpu_slots.release_all()
    finally:
        child.kill()
        child.wait(timeout=10)
    deadline = time.monotonic() + 5
    while (got := cpu_slots.claim_cpus(1, slots)) != {held[0]} and time.monotonic() < deadline:
        cpu_slots.release_all()
        time.sleep(0.05)
    assert got == {held[0]}


def test_pin_threads_binds_this_process(slots):
    before = os.sched_getaffinity(0)
    cpus = cpu_slots.claim_cpus(1, slots)
    try:
        cpu_slots.pin_threads(cpus)
        assert os.sched_getaffinity(0) == cpus
        cpu_slots.pin_threads(None)  # not pinned: nothing changes
        assert os.sched_getaffinity(0) == cpus
    finally:
        cpu_slots.pin_threads(frozenset(before))
    assert os.sched_getaffinity(0) == before


def test_a_cpu_quota_means_no_pinning(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "cpu.max", tmp_path / "cpu.cfs_quota_us"
    v2.write_text("max 100000\n")
    v1.write_text("-1\n")
    assert not cpu_slots.cpu_quota_limited((str(v2), str(v1), str(tmp_path / "absent")))
    v2.write_text("200000 100000\n")  # a pod limited to 2 CPUs of a bigger host
    assert cpu_slots.cpu_quota_limited((str(v2), str(v1)))
    v2.write_text("max 100000\n")
    v1.write_text("150000\n")
    assert cpu_slots.cpu_quota_limited((str(v2), str(v1)))
    monkeypatch.setattr(cpu_slots, "cpu_quota_limited", lambda: True)
    assert cpu_slots.claim_cpus(1, str(tmp_path / "slots")) is None
