"""Output locations without Ray: fresh vs resumed, shard idempotency, half-written files, storage options."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from p2n.data import DataError, open_dataset
from p2n.data.build import ObjectSource, failed_row
from p2n.data.output import prepare_output, shard_name, write_manifest, write_shard
from p2n.data.storage import parse_storage_options


def rows(cfg, *ids):
    return [failed_row(ObjectSource(i), cfg, f"error of {i}", 1.0) for i in ids]


def test_fresh_output_is_accepted_and_resume_on_empty_does_nothing(tmp_path, tiny_cfg):
    assert prepare_output(str(tmp_path / "new"), tiny_cfg, resume=False).done == {}
    (tmp_path / "empty").mkdir()
    assert prepare_output(str(tmp_path / "empty"), tiny_cfg, resume=True).done == {}


def test_existing_output_needs_resume(tmp_path, tiny_cfg):
    out = str(tmp_path / "ds")
    write_shard(rows(tiny_cfg, "single/red/cube/s1-p0"), out)
    with pytest.raises(DataError, match="already exists and is not empty; pass --resume"):
        prepare_output(out, tiny_cfg, resume=False)
    assert prepare_output(out, tiny_cfg, resume=True).done == {"single/red/cube/s1-p0": "failed"}


def test_resume_refuses_a_different_config_or_a_foreign_folder(tmp_path, tiny_cfg):
    out = str(tmp_path / "ds")
    write_shard(rows(tiny_cfg, "single/red/cube/s1-p0"), out)
    write_manifest(out, tiny_cfg, complete=False)
    with pytest.raises(DataError, match=r"fit.steps: 40 -> 41"):
        prepare_output(out, tiny_cfg.override(["fit.steps=41"]), resume=True)
    # Only how to run (dataset.*, threads, device) may change between runs.
    assert prepare_output(out, tiny_cfg.override(["dataset.workers=1", "fit.num_threads=1"]), resume=True).done
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no p2n dataset"):
        prepare_output(str(tmp_path / "other"), tiny_cfg, resume=True)


def test_a_retried_batch_rewrites_its_shard_instead_of_duplicating(tmp_path, tiny_cfg):
    out = tmp_path / "ds"
    a = write_shard(rows(tiny_cfg, "single/red/cube/s1-p0", "single/blue/sphere/s1-p0"), str(out))
    b = write_shard(rows(tiny_cfg, "single/blue/sphere/s1-p0", "single/red/cube/s1-p0"), str(out))
    assert a == b == shard_name(["single/red/cube/s1-p0", "single/blue/sphere/s1-p0"])
    assert len(list((out / "shards").iterdir())) == 1
    assert pq.read_table(out / a).num_rows == 2


def test_half_written_files_are_never_read_and_are_cleaned_on_resume(tmp_path, tiny_cfg):
    out = tmp_path / "ds"
    write_shard(rows(tiny_cfg, "single/red/cube/s1-p0"), str(out))
    stale = out / "shards" / ".part-0123456789abcdef.parquet.tmp-deadbeef"
    stale.write_bytes(b"PAR1 half a file")  # what a run killed mid-write leaves
    ds = open_dataset(str(out))  # no manifest: computed from the complete shards only
    assert ds.manifest["complete"] is False and ds.manifest["counts"]["total"] == 1
    assert prepare_output(str(out), tiny_cfg, resume=True).done == {"single/red/cube/s1-p0": "failed"}
    assert not stale.exists()


def test_manifest_counts_splits_and_failures(tmp_path, tiny_cfg):
    out = str(tmp_path / "ds")
    write_shard(rows(tiny_cfg, "single/red/cube/s1-p0"), out)
    m = write_manifest(out, tiny_cfg, complete=True, source={"num_objects": 1})
    assert m["counts"] == {"total": 1, "ok": 0, "failed": 1, "train": 0, "heldout": 0}
    assert m["failures"] == [{"object_id": "single/red/cube/s1-p0", "error": "error of single/red/cube/s1-p0"}]
    assert m["layout_hash"] == tiny_cfg.field.layout_hash() and m["config"]["fit"]["steps"] == 40
    assert open_dataset(out).manifest == m


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_storage_options_are_a_clear_error(text, message):
    with pytest.raises(DataError, match=message):
        parse_storage_options(text)


def test_storage_options_parse():
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    assert parse_storage_options(None) == {}


def test_opening_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no p2n dataset at"):
        open_dataset(str(tmp_path))
