"""Per-object rows without Ray: fitting, failures, catalogue listing, and the reader round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from p2n.data import DataError, open_dataset, row_params
from p2n.data.build import KIND_FOLDER, ObjectSource, catalogue_sources, fit_object, procedural_sources
from p2n.data.output import write_manifest, write_shard
from p2n.data.schema import COLUMNS, STATUS_FAILED, STATUS_OK
from p2n.nerf.field import NeRFField
from p2n.nerf.params import ParamsError


@pytest.fixture(scope="module")
def fitted_row(tiny_cfg):
    torch.set_num_threads(1)
    return fit_object("single/red/cube/s1-p0", tiny_cfg)


def test_procedural_row_has_the_schema_and_renders_at_its_recorded_psnr(fitted_row, tiny_cfg, tmp_path, helpers):
    row = fitted_row
    assert set(row) == set(COLUMNS)
    assert row["status"] == STATUS_OK and row["error"] == ""
    assert row["object_id"] == "single/red/cube/s1-p0" and row["split"] in ("train", "heldout")
    assert row["captions"] and row["captions"][0] == "a red cube"
    assert row["layout_hash"] == tiny_cfg.field.layout_hash()
    assert row["num_params"] == NeRFField(tiny_cfg.field).num_params
    assert 0 < row["steps"] <= tiny_cfg.fit.steps and row["seconds"] > 0
    assert len(row["views_png"]) == tiny_cfg.scene.num_test_views
    cams = json.loads(row["cameras"])
    assert cams["width"] == cams["height"] == tiny_cfg.scene.image_size and len(cams["c2w"]) == 3
    assert 12 < row["psnr_test"] < 60
    assert abs(helpers.rendered_psnr(row, tiny_cfg) - row["psnr_test"]) < 0.5

    write_shard([row], str(tmp_path / "ds"))
    write_manifest(str(tmp_path / "ds"), tiny_cfg, complete=True)
    ds = open_dataset(str(tmp_path / "ds"))
    (back,) = list(ds.rows())
    assert back["params"] == row["params"] and back["views_png"] == row["views_png"]
    assert ds.manifest["counts"]["ok"] == 1 and ds.manifest["num_params"] == row["num_params"]
    assert ds.field_config == tiny_cfg.field
    df = ds.to_pandas(columns=["object_id", "psnr_test"])
    assert list(df.columns) == ["object_id", "psnr_test"] and df["psnr_test"][0] == pytest.approx(row["psnr_test"])


def test_row_params_refuses_another_layout_and_failed_rows(fitted_row, tiny_cfg):
    other = tiny_cfg.override(["field.log2_hashmap_size=12"]).field
    with pytest.raises(ParamsError, match="log2_hashmap_size"):
        row_params(fitted_row, expected_field_cfg=other)
    failed = {**fitted_row, "status": STATUS_FAILED, "params": b"", "error": "boom"}
    with pytest.raises(DataError, match="no parameters.*boom"):
        row_params(failed)


def test_catalogue_folders_become_sources_with_their_own_ids(catalogue_dir):
    sources = catalogue_sources(str(catalogue_dir))
    assert [s.object_id for s in sources] == ["single/red/cube/s1-p0", "single/blue/sphere/s1-p0",
                                              "single/green/cylinder/s1-p0"]
    assert all(s.kind == KIND_FOLDER for s in sources)
    assert sources[0].uri.endswith("/obj0")


def test_corrupt_image_becomes_a_failed_row(catalogue_dir, tiny_cfg):
    src = ObjectSource("single/green/cylinder/s1-p0", KIND_FOLDER, str(catalogue_dir / "obj2"))
    row = fit_object(src, tiny_cfg)
    assert row["status"] == STATUS_FAILED
    assert "r_0.png is not a readable image" in row["error"]
    assert row["params"] == b"" and row["num_params"] == 0 and math.isnan(row["psnr_test"])
    assert set(row) == set(COLUMNS)


def test_a_fit_that_diverges_is_a_failed_row(tiny_cfg):
    # lr=1e30 drives the parameters to inf/NaN within a step: p2n.nerf.fit raises FitError, the row records it.
    row = fit_object("single/red/cube/s1-p0", tiny_cfg.override(["fit.lr=1.0e+30", "fit.steps=3"]))
    assert row["status"] == STATUS_FAILED and "FitError" in row["error"], row["error"]


@pytest.mark.parametrize("layout, message", [
    ("empty", "has no object folders"),
    ("one_object", "is itself one object"),
    ("stray_folder", "has no transforms_train.json or transforms.json"),
    ("missing", "does not exist"),
])
def test_malformed_catalogue_is_a_clear_error(tmp_path, catalogue_dir, layout, message):
    import shutil

    root = tmp_path / "cat"
    if layout != "missing":
        root.mkdir()
    if layout == "one_object":
        shutil.copytree(catalogue_dir / "obj0", root, dirs_exist_ok=True)
    if layout == "stray_folder":
        shutil.copytree(catalogue_dir / "obj0", root / "a")
        (root / "notes").mkdir()
        (root / "notes" / "readme.txt").write_text("not an object")
    with pytest.raises(DataError, match=message):
        catalogue_sources(str(root))


def test_too_many_procedural_objects_is_a_clear_error(tiny_cfg):
    with pytest.raises(DataError, match="--num-objects 100000"):
        procedural_sources(tiny_cfg, 100000)


@pytest.mark.parametrize("override, message", [
    ("dataset.batches_in_flight=0", "batches_in_flight=0 must be >= 1"),
    ("dataset.objects_per_shard=0", "objects_per_shard=0 must be >= 1"),
    ("dataset.workers=0", "need at least 1 fitting worker"),
])
def test_bad_build_settings_fail_before_ray_starts(tiny_cfg, tmp_path, override, message):
    from ray_jobs.build_dataset import build

    with pytest.raises(DataError, match=message):
        build(str(tmp_path / "ds"), tiny_cfg.override([override]), num_objects=2)
    assert not (tmp_path / "ds").exists()  # nothing was written
