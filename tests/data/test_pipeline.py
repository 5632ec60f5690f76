"""The Ray Data build (ray_jobs/build_dataset.py) end to end on one local 2-CPU Ray: local and S3 (moto) outputs,
a corrupt catalogue object, and resuming an interrupted run."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from p2n.data import DataError, open_dataset
from p2n.data.info import dataset_info
from ray_jobs.cpu_slots import cpu_quota_limited

pytest.importorskip("ray")
build_dataset = pytest.importorskip("ray_jobs.build_dataset")

NEEDS_S3 = True  # ray_session starts the moto server (and its AWS_* env) before Ray, so workers inherit it


def test_local_build_reads_back_everywhere_and_renders_at_recorded_psnr(ray_session, tiny_cfg, tmp_path, helpers,
                                                                        monkeypatch):
    out = str(tmp_path / "ds")
    expected = [s.object_id for s in build_dataset.procedural_sources(tiny_cfg, 3)]
    # The worker handed the last object dies once (as on a lost node): Ray restarts it and retries the batch.
    marker = tmp_path / "killed"
    monkeypatch.setenv("P2N_BUILD_KILL_ONCE", f"{expected[-1]}@{marker}")
    summary = build_dataset.build(out, tiny_cfg, num_objects=3, workers=2, progress=False)
    assert marker.exists(), "the fault was not injected"
    assert summary["fitted"] == 3 and summary["fitted_ok"] == 3 and summary["complete"] is True
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2 and not cpu_quota_limited():
        # One torch thread per actor on a 2-CPU Ray: each actor pinned itself to one core it may use.
        assert summary["worker_cpus"] and all(len(c.split(",")) == 1 for c in summary["worker_cpus"])
        assert {int(c) for c in summary["worker_cpus"]} <= os.sched_getaffinity(0)
    # ... and still every object exactly once (a retried batch rewrites its shard if it had got that far):
    ds = open_dataset(out)
    assert ds.manifest["counts"]["ok"] == 3 and len(ds.shards) == 3
    assert sorted(ds.manifest["splits"]["train"] + ds.manifest["splits"]["heldout"]) == sorted(expected)

    ray_rows = ray_session.data.read_parquet(out).take_all()  # manifest.json is skipped (not .parquet)
    assert sorted(r["object_id"] for r in ray_rows) == sorted(expected)
    df = pd.read_parquet(f"{out}/shards")
    assert sorted(df["object_id"]) == sorted(expected) and (df["status"] == "ok").all()

    for row in ds.rows():
        assert abs(helpers.rendered_psnr(row, tiny_cfg) - row["psnr_test"]) < 0.5, row["object_id"]

    info = dataset_info(out, tmp_path / "sheet.png", sheet_objects=2, sheet_views=2)
    assert info["counts"]["ok"] == 3 and info["failures"] == []
    assert info["psnr_test"]["min"] <= info["psnr_test"]["median"] <= info["psnr_test"]["max"]
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    for o in info["sheet_objects"]:  # 2 of the 3 stored views: close to, not equal to, the 3-view mean
        assert abs(o["psnr_sheet_views"] - o["psnr_test"]) < 3.0

    with pytest.raises(DataError, match="pass --resume"):
        build_dataset.build(out, tiny_cfg, num_objects=3, workers=2, progress=False)


def test_s3_catalogue_to_s3_with_a_corrupt_object(ray_session, s3_server, tiny_cfg, catalogue_dir, helpers):
    helpers.upload(catalogue_dir, "s3://p2n-test/catalogue")
    out = "s3://p2n-test/ds"
    summary = build_dataset.build(out, tiny_cfg, catalogue="s3://p2n-test/catalogue", workers=2, progress=False)
    assert summary["fitted"] == 3 and summary["fitted_ok"] == 2 and summary["fitted_failed"] == 1
    assert summary["failures"][0]["object_id"] == "single/green/cylinder/s1-p0"
    assert "not a readable image" in summary["failures"][0]["error"]

    ds = open_dataset(out)  # endpoint and credentials from the AWS_* environment
    assert ds.manifest["counts"]["ok"] == 2 and ds.manifest["counts"]["failed"] == 1
    for row in ds.rows():
        assert abs(helpers.rendered_psnr(row, tiny_cfg) - row["psnr_test"]) < 0.5, row["object_id"]

    from p2n.data import storage
    from ray_jobs._common import pyarrow_filesystem

    fs, path = storage.url_to_fs(out)
    table = ray_session.data.read_parquet(path, filesystem=pyarrow_filesystem(fs)).to_pandas()
    assert sorted(table["status"]) == ["failed", "ok", "ok"]

    # The endpoint can come from --storage-options instead of the environment.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ENDPOINT_URL")
        opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server}})
        assert sorted(open_dataset(out, storage_options=opts).object_ids(status=None)) == sorted(table["object_id"])


def test_an_interrupted_build_resumes_without_duplicates_or_losses(ray_session, tiny_cfg, tmp_path):
    out = str(tmp_path / "ds")
    n = 4
    with pytest.raises(build_dataset.BuildInterrupted):
        build_dataset.build(out, tiny_cfg, num_objects=n, workers=2, progress=False, stop_after=1)
    first = open_dataset(out)
    written = first.object_ids(status=None)
    assert 1 <= len(written) < n and first.manifest["complete"] is False

    with pytest.raises(DataError, match="pass --resume"):
        build_dataset.build(out, tiny_cfg, num_objects=n, workers=2, progress=False)
    summary = build_dataset.build(out, tiny_cfg, num_objects=n, workers=2, resume=True, progress=False)
    assert summary["skipped"] == len(written) and summary["fitted"] == n - len(written)
    assert summary["complete"] is True

    ids = pd.read_parquet(f"{out}/shards", columns=["object_id"])["object_id"].tolist()
    expected = [s.object_id for s in build_dataset.procedural_sources(tiny_cfg, n)]
    assert sorted(ids) == sorted(expected)  # every object exactly once

    again = build_dataset.build(out, tiny_cfg, num_objects=n, workers=2, resume=True, progress=False)
    assert again["fitted"] == 0 and again["skipped"] == n


def test_scheduling_poll_follows_the_quickest_object_and_is_restored():
    from ray.data._internal.execution import streaming_executor_state as executor_state

    default = executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    with build_dataset._scheduler_poll() as adapt:
        adapt(6.0)
        assert executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == pytest.approx(0.6)
        adapt(30.0)  # a slower object does not lengthen it: the quickest one bounds how late a completion is seen
        assert executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == pytest.approx(0.6)
        adapt(0.2)  # never below Ray's own default
        assert executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == pytest.approx(default)
    assert executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == default
    with pytest.raises(RuntimeError), build_dataset._scheduler_poll() as adapt:
        adapt(500.0)  # capped
        assert executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == pytest.approx(build_dataset.MAX_POLL_S)
        raise RuntimeError("a failed build")
    assert executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == default  # restored on the way out of a failure
