"""Batch generation on Ray Data (``ray_jobs/generate_batch.py`` / ``p2n generate-batch``): a real local Ray, the
prompts file and the output on a real S3 API (moto on 127.0.0.1). Rows must hold exactly what one forward pass of
the same prompts gives, a refused prompt must become a failed row without sinking its batch, and a resumed run
must generate only what is missing."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from p2n.config import P2NConfig
from p2n.generate import Generator
from p2n.generate_batch import BatchError, prepare_output, read_generations, read_prompts
from p2n.nerf.params import params_from_bytes

NEEDS_S3 = True

PROMPTS = ["a red cube", "a blue ball", "", "one box, painted green", "bad \x01 prompt", "a yellow torus",
           "a green cone", "  a purple cylinder  "]


def put(uri: str, data: bytes) -> None:
    from p2n.data import storage

    fs, path = storage.url_to_fs(uri)
    fs.pipe_file(path, data)


def test_a_prompts_file_becomes_one_row_per_prompt_and_resumes(ray_session, tiny_gen_ckpt, tiny_generator,
                                                               tmp_path, monkeypatch):
    from ray_jobs.generate_batch import generate_batch

    cfg = P2NConfig().override(tiny_generator.SCENE)
    prompts_uri, out = "s3://p2n-test/batch/prompts.txt", "s3://p2n-test/batch/out"
    put(prompts_uri, ("\ufeff" + "\r\n".join(PROMPTS[:6]) + "\r\n").encode())
    # The worker handed the second batch dies once (as on a lost node): Ray restarts it and retries the batch.
    marker = tmp_path / "killed"
    monkeypatch.setenv("P2N_BATCH_KILL_ONCE", f"4@{marker}")
    s = generate_batch(str(tiny_gen_ckpt), prompts_uri, out, cfg, workers=1, batch_size=3, views=2, progress=False)
    monkeypatch.delenv("P2N_BATCH_KILL_ONCE")
    assert marker.exists(), "the fault was not injected"
    assert (s["prompts"], s["generated"], s["failed"], s["complete"]) == (5, 4, 1, True)
    assert s["failures"][0]["index"] == 3 and "control character U+0001" in s["failures"][0]["error"]

    rows = read_generations(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]  # every prompt once, the retried batch included
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "ok"]
    assert rows[3]["params"] is None and rows[3]["views_png"] is None
    # the same parameters as one local forward pass of the good prompts (batch composition does not matter)
    gen = Generator.load(str(tiny_gen_ckpt), cfg)
    good = [r for r in rows if r["status"] == "ok"]
    expected = gen.from_prompts([r["prompt"] for r in good]).params
    for r, want in zip(good, expected):
        flat, field, meta = params_from_bytes(r["params"], gen.cfg.field)
        torch.testing.assert_close(flat, want, atol=1e-5, rtol=0)
        assert meta["prompt"] == r["prompt"] and meta["checkpoint"] == str(tiny_gen_ckpt)
        img = Image.open(io.BytesIO(r["views_png"]))
        size = gen.cfg.scene.image_size
        assert img.size[1] == size + 4 and img.size[0] >= 2 * size  # two views side by side, 2 px padding
    manifest = json.loads(read_bytes(f"{out}/manifest.json"))
    assert (manifest["kind"], manifest["rows"], manifest["ok"], manifest["failed"]) == ("p2n.generations", 5, 4, 1)

    with pytest.raises(BatchError, match="already holds 5 generated rows; pass --resume"):
        generate_batch(str(tiny_gen_ckpt), prompts_uri, out, cfg, progress=False)
    put(prompts_uri, "\n".join(PROMPTS).encode())  # two more prompts at the end
    s = generate_batch(str(tiny_gen_ckpt), prompts_uri, out, cfg, workers=1, views=0, resume=True, progress=False)
    assert (s["prompts"], s["skipped"], s["generated"], s["failed"], s["rows"]) == (7, 5, 2, 0, 7)
    rows = read_generations(out)
    assert [r["prompt"] for r in rows[5:]] == ["a green cone", "a purple cylinder"] and rows[6]["views_png"] is None


def read_bytes(uri: str) -> bytes:
    from p2n.data import storage

    fs, path = storage.url_to_fs(uri)
    return fs.cat_file(path)


def test_bad_inputs_are_refused_before_ray_starts(tmp_path, tiny_gen_ckpt):
    from ray_jobs.generate_batch import generate_batch

    with pytest.raises(BatchError, match="not found"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    with pytest.raises(BatchError, match="has no prompts"):
        read_prompts(str(tmp_path / "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cube\n".encode("latin-1"))
    with pytest.raises(BatchError, match="is not UTF-8 text"):
        read_prompts(str(tmp_path / "latin1.txt"))
    with pytest.raises(BatchError, match="is a folder"):
        read_prompts(str(tmp_path))
    (tmp_path / "p.txt").write_text("a red cube\n")
    with pytest.raises(BatchError, match="--batch-size 0: must be at least 1"):
        generate_batch(str(tiny_gen_ckpt), str(tmp_path / "p.txt"), str(tmp_path / "o"), batch_size=0)
    with pytest.raises(Exception, match="not a generator checkpoint|does not exist|not found"):
        generate_batch(str(tmp_path / "p.txt"), str(tmp_path / "p.txt"), str(tmp_path / "o2"))
    # an output folder that holds something else (a dataset) is not written into
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps({"format": "p2n-dataset"}))
    with pytest.raises(BatchError, match="holds something else"):
        prepare_output(str(tmp_path / "ds"), resume=True)
