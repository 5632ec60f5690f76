"""`p2n refine` end to end through ``p2n.cli.main``: a multiview refinement of a procedural scene writes params,
curve and turntable and resumes where it stopped; a generated init comes from a generator checkpoint; an image
guidance runs from a prompt; mistakes are one clear line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from p2n.cli import main
from p2n.nerf.params import load_params

# CPU even where a GPU is visible: CUDA's atomic adds in the hash-grid backward are not bit-reproducible, and
# these tests compare runs bit for bit.
TINY = ["refine.device=cpu", "refine.guidance.device=cpu", "scene.image_size=24", "scene.num_train_views=12",
        "scene.num_test_views=2", "render.num_samples=32", "render.occupancy_resolution=16", "refine.rays_per_step=512",
        "refine.image_size=16", "refine.eval_views=null", "refine.eval_every=10", "refine.checkpoint_every=10",
        "refine.lr=0.02"]
FAST = [a for s in TINY for a in ("--set", s)] + ["--no-progress", "--threads", "1"]


def run_here(capsys, *args) -> dict:
    """``p2n ARGS`` through the CLI's ``main`` in this process (no interpreter start-up: importing torch costs more
    than these tiny runs); its JSON line."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_multiview_refine_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["refine", "--init", "scratch", "--guidance", "multiview", "--scene", "a yellow cube", "--out", str(out)]
    rec = run_here(capsys, *common, "--steps", "40", *FAST)
    assert rec["steps"] == 40 and rec["resumed_from"] == 0 and rec["target"] == "single/yellow/cube/s1-p0"
    assert rec["psnr_test"] > rec["psnr_start"] + 5, rec
    for name in ("params.safetensors", "curve.json", "curve.png", "turntable.gif", "config.yaml",
                 "ckpt/params.safetensors", "ckpt/state.safetensors", "ckpt/state.json"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "curve.json").read_text())
    assert [r["step"] for r in doc["curve"]] == list(range(41))
    assert [r["step"] for r in doc["curve"] if "psnr_test" in r] == [0, 10, 20, 30, 40]
    assert doc["curve"][-1]["psnr_test"] == pytest.approx(rec["psnr_test"], abs=1e-3)
    assert Image.open(out / "turntable.gif").n_frames == 24
    first, _, _ = load_params(out / "params.safetensors")

    # A longer budget continues from the step-40 checkpoint instead of starting over.
    rec2 = run_here(capsys, *common, "--steps", "50", "--resume", *FAST)
    assert rec2["resumed_from"] == 40 and rec2["steps"] == 50
    doc2 = json.loads((out / "curve.json").read_text())
    assert [r["step"] for r in doc2["curve"]] == list(range(51))
    assert doc2["curve"][:41] == doc["curve"]  # the first 40 steps are kept, not rerun
    second, _, _ = load_params(out / "params.safetensors")
    assert not torch.equal(first, second)


def test_clip_refine_from_a_prompt(tmp_path, capsys):
    rec = run_here(capsys, "refine", "--init", "scratch", "--guidance", "clip", "--prompt", "a red cube", "--steps",
                   "3", "--out", str(tmp_path), *FAST)
    assert rec["steps"] == 3 and rec["psnr_test"] is None and rec["loss"] > 0  # no ground truth: loss only
    doc = json.loads((tmp_path / "curve.json").read_text())
    assert all(r["grad_table"] > 0 and r["grad_mlp"] > 0 for r in doc["curve"][1:])
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_generated_init_from_a_checkpoint(tmp_path, capsys, tiny_generator_ckpt):
    common = ["refine", "--guidance", "multiview", "--scene", "a green sphere", "--steps", "10", *FAST]
    gen = run_here(capsys, *common, "--init", "generated", "--ckpt", str(tiny_generator_ckpt), "--out",
                   str(tmp_path / "g"))
    scratch = run_here(capsys, *common, "--init", "scratch", "--out", str(tmp_path / "s"))
    # The generator's guess (a green cube) already shows a green object; the shared init is a grey fog.
    assert gen["psnr_start"] > scratch["psnr_start"] + 5, (gen, scratch)
    assert gen["psnr_test"] > scratch["psnr_test"], (gen, scratch)
    _, _, meta = load_params(tmp_path / "g" / "params.safetensors")
    assert meta["init"] == "generated" and meta["ckpt"] == str(tiny_generator_ckpt)


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
