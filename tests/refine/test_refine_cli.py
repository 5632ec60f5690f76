"""`p2n refine` end to end: a multiview refinement of a procedural scene writes params, curve and turntable and
resumes where it stopped; an image guidance runs from a prompt; mistakes are one clear line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from p2n.cli import main
from p2n.nerf.params import load_params

TINY = ["field.num_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64", "field.hidden_dim=32",
        "field.color_hidden_dim=32", "scene.image_size=24", "scene.num_train_views=12", "scene.num_test_views=2",
        "render.num_samples=32", "render.occupancy_resolution=16", "refine.rays_per_step=512", "refine.image_size=16",
        "refine.eval_views=null", "refine.eval_every=10", "refine.checkpoint_every=10"]
FAST = [a for s in TINY for a in ("--set", s)] + ["--no-progress", "--threads", "1"]


def p2n(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "p2n.cli", *args], capture_output=True, text=True, timeout=timeout)


def _record(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_multiview_refine_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "run"
    common = ["refine", "--init", "scratch", "--guidance", "multiview", "--scene", "a yellow cube", "--out", str(out)]
    rec = _record(p2n(*common, "--steps", "30", *FAST))
    assert rec["steps"] == 30 and rec["resumed_from"] == 0 and rec["target"] == "single/yellow/cube/s1-p0"
    assert rec["psnr_test"] > rec["psnr_start"] + 5, rec
    for name in ("params.safetensors", "curve.json", "curve.png", "turntable.gif", "config.yaml",
                 "ckpt/params.safetensors", "ckpt/state.safetensors", "ckpt/state.json"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "curve.json").read_text())
    assert [r["step"] for r in doc["curve"]] == list(range(31))
    assert [r["step"] for r in doc["curve"] if "psnr_test" in r] == [0, 10, 20, 30]
    assert doc["curve"][-1]["psnr_test"] == pytest.approx(rec["psnr_test"], abs=1e-3)
    assert Image.open(out / "turntable.gif").n_frames == 24
    first, _, _ = load_params(out / "params.safetensors")

    # A longer budget continues from the step-30 checkpoint instead of starting over.
    rec2 = _record(p2n(*common, "--steps", "40", "--resume", *FAST))
    assert rec2["resumed_from"] == 30 and rec2["steps"] == 40
    doc2 = json.loads((out / "curve.json").read_text())
    assert [r["step"] for r in doc2["curve"]] == list(range(41))
    assert doc2["curve"][:31] == doc["curve"]  # the first 30 steps are kept, not rerun
    second, _, _ = load_params(out / "params.safetensors")
    assert not torch.equal(first, second)


def test_clip_refine_from_a_prompt(tmp_path):
    rec = _record(p2n("refine", "--init", "scratch", "--guidance", "clip", "--prompt", "a red cube", "--steps", "3",
                      "--out", str(tmp_path), *FAST))
    assert rec["steps"] == 3 and rec["psnr_test"] is None and rec["loss"] > 0  # no ground truth: loss only
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert all(r["grad_table"] > 0 and r["grad_mlp"] > 0 for r in doc["curve"][1:])
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("args, expect", [
    (["--guidance", "dreamfusion", "--scene", "a red cube"], ["'dreamfusion'", "clip", "multiview", "sds", "zero123"]),
    (["--init", "random", "--scene", "a red cube"], ["'random'", "generated", "mean", "scratch"]),
    (["--guidance", "sds", "--prompt", "a red cube"], ["model_path", "tiny", "--model-path"]),
    (["--guidance", "sds", "--prompt", "a red cube", "--model-path", "/no/such/model"], ["not a folder", "tiny"]),
    (["--init", "generated", "--scene", "a red cube"], ["--ckpt", "--init scratch"]),
    (["--init", "generated", "--scene", "a red cube", "--ckpt", "/no/such/ckpt"], ["/no/such/ckpt", "--init scratch"]),
    (["--guidance", "multiview", "--prompt", "a red cube"], ["--data", "--scene"]),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys, args, expect):
    argv = ["refine", "--out", str(tmp_path), "--steps", "1", *FAST, *args]
    if "--init" not in args:
        argv += ["--init", "scratch"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2n refine: error:") and "\n" not in err and "Traceback" not in err
    for word in expect:
        assert word in err, (word, err)
