"""Refinement jobs without Ray: the runner finishes, resumes from its checkpoint after its worker dies (ending
exactly where an uninterrupted run ends), leaves a job alone that a live worker holds, honours cancellation, and
gives up after too many attempts."""

from __future__ import annotations

import json

import pytest
import torch

from p2n.config import P2NConfig
from p2n.nerf.params import params_from_bytes
from serve.jobs import JobStore, lease_expired, run_job
from serve.store import ArtefactStore
from tiny_generator import FIELD, SERVICE

STEPS = 12


class Died(BaseException):
    """What a killed process looks like to the code after it: nothing more runs, nothing is recorded."""


@pytest.fixture(scope="module")
def cfg() -> P2NConfig:
    return P2NConfig().override(FIELD + SERVICE + [f"refine.steps={STEPS}", "refine.checkpoint_every=4",
                                                   "refine.eval_every=4"])


def new_job(jobs: JobStore, cfg: P2NConfig, scene: str = "a red cube") -> str:
    job_id = jobs.new_id()
    request = {"scene": scene, "guidance": "multiview", "init": "scratch", "steps": STEPS, "prompt": None}
    jobs.create(job_id, request, cfg.to_dict(), {})
    return job_id


@pytest.fixture
def jobs(tmp_path) -> JobStore:
    return JobStore(ArtefactStore(str(tmp_path / "store")))


@pytest.fixture(scope="module")
def uninterrupted(cfg, tmp_path_factory) -> torch.Tensor:
    jobs = JobStore(ArtefactStore(str(tmp_path_factory.mktemp("ref") / "store")))
    job_id = new_job(jobs, cfg)
    state = run_job(jobs, job_id, "w0")
    assert state["state"] == "succeeded", state
    params, _, _ = params_from_bytes(jobs.read_file(job_id, "result/params.safetensors"), cfg.field)
    return params


def test_job_runs_to_a_result(jobs, cfg, uninterrupted):
    job_id = new_job(jobs, cfg)
    assert jobs.active_ids() == [job_id]
    state = run_job(jobs, job_id, "w1")
    assert state["state"] == "succeeded" and state["step"] == STEPS and state["attempts"] == 1
    assert state["owner"] is None and jobs.active_ids() == []  # finished jobs leave the active index
    curve = json.loads(jobs.read_file(job_id, "result/curve.json"))["curve"]
    assert [r["step"] for r in curve] == list(range(STEPS + 1))
    assert state["result"]["psnr_test"] == curve[-1]["psnr_test"] and state["psnr_test"] == curve[-1]["psnr_test"]
    params, _, _ = params_from_bytes(jobs.read_file(job_id, "result/params.safetensors"), cfg.field)
    assert torch.equal(params, uninterrupted)  # same seed, same request: the same NeRF


def test_a_job_whose_worker_died_resumes_from_its_checkpoint(jobs, cfg, uninterrupted):
    job_id = new_job(jobs, cfg)

    def die_at_10(step: int) -> None:
        if step == 10:
            raise Died()

    with pytest.raises(Died):
        run_job(jobs, job_id, "w-dead", hook=die_at_10)
    state = jobs.state(job_id)
    assert state["state"] == "running" and state["owner"] == "w-dead" and 1 <= state["step"] <= 10
    assert jobs.store.exists(f"jobs/{job_id}/ckpt/state.json")  # the step-8 checkpoint is on the store
    # While w-dead counts as alive and its lease is fresh, a second dispatch leaves the job alone.
    assert run_job(jobs, job_id, "w2", is_alive=lambda name: name == "w-dead", lease_s=60)["state"] == "running"
    assert jobs.state(job_id)["owner"] == "w-dead"
    # Once it is gone, the next worker takes over and resumes from step 8.
    state = run_job(jobs, job_id, "w2", is_alive=lambda name: False, lease_s=60)
    assert state["state"] == "succeeded" and state["attempts"] == 2
    assert state["resumed_from_step"] == 8 and state["resumes"] == [{"from_step": 8, "attempt": 2}]
    params, _, _ = params_from_bytes(jobs.read_file(job_id, "result/params.safetensors"), cfg.field)
    assert torch.allclose(params, uninterrupted, atol=1e-6), (params - uninterrupted).abs().max()


def test_cancel_stops_a_running_job_at_its_next_step(jobs, cfg):
    job_id = new_job(jobs, cfg)
    steps_seen = []

    def cancel_at_3(step: int) -> None:
        steps_seen.append(step)
        if step == 3:
            jobs.request_cancel(job_id)

    state = run_job(jobs, job_id, "w1", hook=cancel_at_3)
    assert state["state"] == "cancelled" and steps_seen == [1, 2, 3]
    assert jobs.active_ids() == [] and not jobs.store.exists(f"jobs/{job_id}/result/params.safetensors")
    assert run_job(jobs, job_id, "w2")["state"] == "cancelled"  # a finished job is never run again


def test_a_job_that_keeps_killing_workers_fails_with_a_reason(jobs, cfg):
    job_id = new_job(jobs, cfg)
    jobs.update(job_id, attempts=3)
    state = run_job(jobs, job_id, "w1", max_attempts=3)
    assert state["state"] == "failed" and state["error"]["code"] == "too_many_attempts"
    assert "3 attempts" in state["error"]["message"]


def test_a_bad_request_fails_the_job_not_the_worker(jobs, cfg):
    job_id = new_job(jobs, cfg, scene="a chartreuse dodecahedron")
    state = run_job(jobs, job_id, "w1")
    assert state["state"] == "failed" and state["error"]["code"] != "internal", state["error"]
    assert "dodecahedron" in state["error"]["message"]


def test_lease_expiry():
    assert lease_expired({"heartbeat": 100.0}, 10, now=111.0)
    assert not lease_expired({"heartbeat": 100.0}, 10, now=105.0)
    assert lease_expired({"heartbeat": None, "updated": 50.0}, 10, now=70.0)  # queued: counts from its update
