"""`p2n dataset` on bad input: one line on stderr, exit code 2, before any Ray starts."""

from __future__ import annotations

import json

import pytest

from p2n.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["dataset", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_existing_out_without_resume(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "something").write_text("x")
    rc, _, err = run(capsys, "build", "--out", str(tmp_path / "ds"), "--num-objects", "1")
    assert rc == 2
    assert err.count("\n") == 1 and "pass --resume" in err and "choose another --out" in err


def test_bad_storage_options(tmp_path, capsys):
    rc, _, err = run(capsys, "build", "--out", str(tmp_path / "ds"), "--storage-options", "{oops")
    assert rc == 2 and "--storage-options is not valid JSON" in err and err.count("\n") == 1


def test_malformed_catalogue(tmp_path, capsys):
    (tmp_path / "cat" / "obj0").mkdir(parents=True)
    (tmp_path / "cat" / "obj0" / "image.png").write_bytes(b"x")
    rc, _, err = run(capsys, "build", "--out", str(tmp_path / "ds"), "--catalogue", str(tmp_path / "cat"))
    assert rc == 2 and "has no transforms_train.json or transforms.json" in err


def test_bad_config_value(tmp_path, capsys):
    rc, _, err = run(capsys, "build", "--out", str(tmp_path / "ds"), "--set", "fit.nosuchkey=1")
    assert rc == 2 and "unknown config key" in err


def test_num_objects_and_catalogue_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dataset", "build", "--out", str(tmp_path), "--num-objects", "2", "--catalogue", str(tmp_path)])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_info_on_a_missing_dataset(tmp_path, capsys):
    rc, out, err = run(capsys, "info", str(tmp_path / "nothing"))
    assert rc == 2 and out == "" and "no p2n dataset at" in err


def test_info_prints_counts_failures_and_the_sheet_path(tmp_path, capsys, tiny_cfg, helpers):
    from p2n.data.build import ObjectSource, failed_row
    from p2n.data.output import write_manifest, write_shard

    out = str(tmp_path / "ds")
    write_shard([failed_row(ObjectSource("single/red/cube/s1-p0"), tiny_cfg, "FitError: diverged")], out)
    write_manifest(out, tiny_cfg, complete=True)
    rc, stdout, _ = run(capsys, "info", out, "--sheet", str(tmp_path / "sheet.png"))
    rec = json.loads(stdout)
    assert rc == 0 and rec["counts"] == {"total": 1, "ok": 0, "failed": 1}
    assert rec["failures"] == [{"object_id": "single/red/cube/s1-p0", "error": "FitError: diverged"}]
    assert rec["psnr_test"]["median"] is None and rec["sheet"] is None  # nothing to draw without ok rows
