"""`p2n generate`, `p2n interpolate` and `p2n eval` as users run them.

Most runs go through ``p2n.cli.main`` in this process (importing torch in a fresh interpreter costs more than
these tiny runs); the ``--help`` checks and one bad-input run use ``python -m p2n`` / the ``p2n`` script, so the
real process's exit code and stderr are checked too.

Covered: generate from one prompt (every output file, the printed timings, the params file in the checkpoint's
field layout, a coloured mesh inside the scene bounds), two prompts in one batch, ``--prompts-file``, an image
prompt; bad prompts, images and checkpoints as one clear line with exit code 2; interpolate's frame count and
that its walk starts and ends at the two prompts' objects; eval refusing a checkpoint with another field layout
and writing its reports for a matching one; ``--help`` of all three.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pngs import png_header_only

from p2n.cli import main
from p2n.config import P2NConfig
from p2n.generate import Generator, decode_image
from p2n.nerf.params import load_params, save_params
from p2n.train.testing import TINY_OVERRIDES


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def gen_args(tiny_generator) -> list[str]:
    # The tiny generator's own scene/render settings: 24 px views, and the sample count its mean NeRF was fitted
    # with (the mesh iso-level follows the sample step, so the default 64 samples would find no surface).
    return sets(tiny_generator.SCENE) + ["--threads", "1"]


@pytest.fixture(scope="module")
def gen_field(tiny_generator):
    return P2NConfig().override(tiny_generator.FIELD).field


def p2n(capsys, *args) -> tuple[int, str, str]:
    """``p2n ARGS`` through the CLI's ``main`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def succeeds(capsys, *args) -> dict:
    """Runs ``p2n ARGS``, expects exit code 0 and returns its JSON line."""
    rc, out, err = p2n(capsys, *args)
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def refused(capsys, command: str, *args) -> str:
    """Runs ``p2n COMMAND ARGS``, expects exit code 2 with one ``error:`` line on stderr; returns that line."""
    rc, out, err = p2n(capsys, command, *args)
    err = err.strip()
    assert rc == 2, (rc, out, err)
    assert err.startswith(f"p2n {command}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def red_disc_png(path: Path, size: int = 48) -> Path:
    """A real PNG image prompt: a red disc on a transparent background."""
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (220, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def tile(png: Path, i: int, side: int) -> np.ndarray:
    """Image ``i`` of the last row of a ``p2n.viz.image_grid`` (pad 2, scale 2) as float RGB: the generated views
    (a prompt naming a procedural object has its true views in a row above)."""
    s = 2 * side
    grid = np.asarray(Image.open(png).convert("RGB"), np.float32)
    x, y = 2 + i * (s + 2), grid.shape[0] - s - 2
    return grid[y:y + s, x:x + s]


# ---- generate ------------------------------------------------------------------------------------------------
def test_generate_one_prompt_writes_params_pictures_and_a_coloured_mesh(tmp_path, capsys, tiny_gen_ckpt, gen_args,
                                                                       gen_field):
    trimesh = pytest.importorskip("trimesh")
    out = tmp_path / "out"
    rec = succeeds(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--prompt", "a red cube", "--out", out,
                   "--frames", 6, *gen_args)
    assert rec["count"] == 1 and rec["generate_ms"] > 0 and rec["render_ms"] > 0, rec
    d = out / "00-a-red-cube"
    item = rec["items"][0]
    assert item["prompt"] == "a red cube" and Path(item["dir"]) == d
    # The MP4 is optional (only with an ffmpeg backend); everything else is promised by --help.
    assert [f for f in item["files"] if f != "turntable.mp4"] == ["params.safetensors", "views.png",
                                                                  "turntable.gif", "mesh.ply", "mesh.glb"], item
    for name in item["files"]:
        assert (d / name).stat().st_size > 0, name
    assert json.loads((out / "generate.json").read_text())["items"] == rec["items"]

    flat, field, meta = load_params(d / "params.safetensors", expected=gen_field)
    assert meta["prompt"] == "a red cube" and meta["checkpoint"] == str(tiny_gen_ckpt)
    expected = Generator.load(str(tiny_gen_ckpt), device="cpu").from_prompts(["a red cube"]).params[0]
    assert torch.allclose(flat, expected, atol=1e-6)  # the file holds what the generator made of the prompt

    # "a red cube" names a procedural object: views.png shows its true views above the generated ones, and the
    # generated NeRF (this checkpoint always decodes a green sphere) scores low against them
    assert item["truth"] == "single/red/cube/s1-p0" and 5 < item["psnr_vs_truth"] < 20, item
    grid = np.asarray(Image.open(d / "views.png").convert("RGB")).astype(int)
    assert grid.shape == (2 * (48 + 2) + 2, 8 * (48 + 2) + 2, 3)  # 2 rows x 8 views of 24 px, shown 2x
    truth_row, gen_row = grid[2:50], grid[52:100]
    red = (truth_row[..., 0] > truth_row[..., 1] + 60).mean()
    green = (gen_row[..., 1] > gen_row[..., 0] + 30).mean()
    assert red > 0.05 and (gen_row[..., 0] > gen_row[..., 1] + 60).mean() < 0.01 and green > 0.02, (red, green)
    gif = Image.open(d / "turntable.gif")
    assert gif.n_frames == 6 and gif.size == (24, 24)

    mesh = trimesh.load(d / "mesh.ply")
    lo, hi = mesh.bounds
    assert np.isfinite(mesh.vertices).all() and len(mesh.faces) > 100
    assert (lo >= -field.aabb_scale).all() and (hi <= field.aabb_scale).all(), mesh.bounds
    assert (hi - lo).min() > 0.5, mesh.bounds  # an object, not a speck of noise
    assert mesh.visual.kind == "vertex"
    rgb = mesh.visual.vertex_colors[:, :3].astype(float).mean(0)
    # Every NeRF this checkpoint decodes is its fitted green sphere, give or take 1 %: the colours must say so.
    assert rgb[1] > rgb[0] + 30 and rgb[1] > rgb[2] + 30, rgb
    glb = trimesh.load(d / "mesh.glb")
    assert sum(len(g.vertices) for g in glb.geometry.values()) == len(mesh.vertices)


def test_two_prompts_are_generated_in_one_batch(tmp_path, capsys, tiny_gen_ckpt, gen_args, gen_field):
    prompts = ["a red cube", "a blue sphere"]
    rec = succeeds(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--prompt", prompts[0], "--prompt", prompts[1],
                   "--out", tmp_path, "--no-mesh", "--no-video", *gen_args)
    assert rec["count"] == 2 and [i["prompt"] for i in rec["items"]] == prompts
    assert [Path(i["dir"]).name for i in rec["items"]] == ["00-a-red-cube", "01-a-blue-sphere"]
    assert all(i["files"] == ["params.safetensors", "views.png"] for i in rec["items"])
    assert not list(tmp_path.rglob("*.gif")) and not list(tmp_path.rglob("mesh.*"))  # --no-video, --no-mesh
    saved = [load_params(tmp_path / n / "params.safetensors", gen_field)[0] for n in ("00-a-red-cube",
                                                                                       "01-a-blue-sphere")]
    batch = Generator.load(str(tiny_gen_ckpt), device="cpu").from_prompts(prompts).params
    assert torch.allclose(torch.stack(saved), batch, atol=1e-6)
    assert not torch.equal(saved[0], saved[1])


def test_prompts_file_skips_blank_lines(tmp_path, capsys, tiny_gen_ckpt, gen_args):
    f = tmp_path / "prompts.txt"
    f.write_bytes("\ufeffa yellow torus\r\n\r\n   \r\n  a wooden chair \r\n".encode())  # BOM, CRLF, padding
    rec = succeeds(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--prompts-file", f, "--out", tmp_path / "o",
                   "--no-mesh", "--no-video", *gen_args)
    assert [i["prompt"] for i in rec["items"]] == ["a yellow torus", "a wooden chair"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if p.is_dir()) == ["00-a-yellow-torus",
                                                                                "01-a-wooden-chair"]
    # only a prompt that names a procedural object has a ground truth to be scored against
    assert rec["items"][0]["truth"] == "single/yellow/torus/s1-p0" and "truth" not in rec["items"][1]
    assert "psnr_vs_truth" not in rec["items"][1]


def test_image_prompt(tmp_path, capsys, tiny_gen_ckpt, gen_args, gen_field):
    png = red_disc_png(tmp_path / "red disc.png")
    rec = succeeds(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--image", png, "--out", tmp_path / "o",
                   "--no-mesh", "--no-video", *gen_args)
    d = tmp_path / "o" / "00-red-disc"
    assert rec["count"] == 1 and Path(rec["items"][0]["dir"]) == d
    flat, _, meta = load_params(d / "params.safetensors", gen_field)
    assert meta["prompt"] == str(png)
    gen = Generator.load(str(tiny_gen_ckpt), device="cpu")
    assert torch.allclose(flat, gen.from_images(decode_image(png.read_bytes())).params[0], atol=1e-6)
    assert not torch.allclose(flat, gen.from_images(torch.ones(48, 48, 3)).params[0], atol=1e-6)


@pytest.mark.parametrize("prompt, expect", [
    ("", ["empty prompt"]),
    ("  \t  ", ["empty prompt"]),
    (" ".join(["red"] * 500), ["502 tokens", "77", "shorten"]),  # 500 words + start/end tokens
    ("a red\x00cube", ["control character", "U+0000"]),
])
def test_bad_prompts_are_one_line(tmp_path, capsys, tiny_gen_ckpt, gen_args, prompt, expect):
    err = refused(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--prompt", prompt, "--out", tmp_path / "o",
                  *gen_args)
    assert all(w in err for w in expect), err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def _bad_image(path: Path, case: str) -> Path:
    if case == "text":
        path.write_text("this is a shopping list, not a picture\n")
    elif case == "truncated":
        rng = np.random.default_rng(0)  # noise: the PNG stays large enough to cut in the middle of its data
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:4000])
    elif case == "1x1":
        Image.new("RGB", (1, 1), (255, 0, 0)).save(path)
    return path


@pytest.mark.parametrize("case, expect", [
    ("text", ["not a readable image"]),
    ("truncated", ["corrupt image data", "truncated"]),
    ("1x1", ["1x1", "too small", "8x8"]),
    ("missing", ["No such file"]),
])
def test_bad_images_are_one_line(tmp_path, capsys, tiny_gen_ckpt, gen_args, case, expect):
    png = _bad_image(tmp_path / "in.png", case)
    err = refused(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--image", png, "--out", tmp_path / "o", *gen_args)
    assert str(png) in err and all(w in err for w in expect), err


def test_a_20000x20000_image_is_refused_from_its_header(tmp_path, capsys, tiny_gen_ckpt, gen_args):
    png = tmp_path / "huge.png"
    png.write_bytes(png_header_only(20000, 20000))
    assert png.stat().st_size < 100
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    err = refused(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--image", png, "--out", tmp_path / "o", *gen_args)
    seconds = time.perf_counter() - t
    assert "400000000 pixels" in err and "downscale" in err, err
    # Decoding would need 1.2 GB (and some seconds); refusing from the header needs neither.
    assert seconds < 5, seconds
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kb < 200 * 1024


@pytest.mark.parametrize("kind, expect", [
    ("vae folder", ["align.safetensors"]),
    ("dataset folder", ["align.safetensors"]),
    ("vae file", ["is a VAE"]),
    ("params file", ["NeRF parameters"]),
    ("text file", ["is not a folder"]),
    ("missing", ["no model file"]),
])
def test_wrong_checkpoints_say_what_a_generator_checkpoint_is(tmp_path, capsys, request, tiny_gen_ckpt, gen_args,
                                                              gen_field, kind, expect):
    if kind == "vae folder":
        ckpt = request.getfixturevalue("tiny_vae_dir")  # the --out of `p2n train vae`
    elif kind == "dataset folder":
        ckpt = request.getfixturevalue("tiny_dataset")
    elif kind == "vae file":
        ckpt = tiny_gen_ckpt / "vae.safetensors"
    elif kind == "params file":
        ckpt = tmp_path / "params.safetensors"
        from p2n.nerf.field import param_layout

        save_params(ckpt, torch.zeros(param_layout(gen_field).numel), gen_field)
    elif kind == "text file":
        ckpt = tmp_path / "model"
        ckpt.write_text("not a model\n")
    else:
        ckpt = tmp_path / "no-such-checkpoint"
    err = refused(capsys, "generate", "--ckpt", ckpt, "--prompt", "a red cube", "--out", tmp_path / "o", *gen_args)
    assert str(ckpt) in err and "not a generator checkpoint" in err and "`p2n train align`" in err, err
    assert all(w in err for w in expect), err


@pytest.mark.parametrize("args, expect", [
    (["--prompt", "a red cube", "--frames", "0"], ["--frames 0"]),
    (["--prompt", "a red cube", "--size", "-3"], ["--size -3"]),
    (["--prompts-file", "/no/such/prompts.txt"], ["/no/such/prompts.txt"]),
])
def test_generate_flag_mistakes_are_one_line(tmp_path, capsys, tiny_gen_ckpt, gen_args, args, expect):
    err = refused(capsys, "generate", "--ckpt", tiny_gen_ckpt, "--out", tmp_path / "o", *args, *gen_args)
    assert all(w in err for w in expect), err


def test_a_real_process_reports_bad_input_without_a_traceback(tmp_path, tiny_gen_ckpt):
    png = tmp_path / "huge.png"
    png.write_bytes(png_header_only(20000, 20000))
    script = Path(sys.executable).parent / "p2n"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "p2n"]
    r = subprocess.run([*cmd, "generate", "--ckpt", str(tiny_gen_ckpt), "--image", str(png), "--out",
                        str(tmp_path / "o"), "--threads", "1"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("p2n generate: error:") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ---- interpolate -----------------------------------------------------------------------------------------------
def test_interpolate_writes_one_frame_per_step(tmp_path, capsys, tiny_gen_ckpt, gen_args):
    out = tmp_path / "anim" / "interp.gif"
    rec = succeeds(capsys, "interpolate", "--ckpt", tiny_gen_ckpt, "--from", "a red cube", "--to", "a blue sphere",
                   "--steps", 4, "--out", out, *gen_args)
    assert rec == {"out": str(out), "strip": str(out.with_suffix(".png")), "steps": 4, "from": "a red cube",
                   "to": "a blue sphere"}
    gif = Image.open(out)
    assert gif.n_frames == 4 and gif.size == (24, 24)
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), np.float32))
    assert np.abs(frames[0] - frames[-1]).mean() > 1.0  # the orbit moved (and the path was walked)
    assert Image.open(out.with_suffix(".png")).size == (4 * (48 + 2) + 2, 48 + 4)


def test_interpolation_starts_and_ends_at_the_two_prompts(tmp_path, capsys, trained_gen_ckpt):
    # With 8 steps the interpolation's cameras are generate's 8 views, so the walk's first frame must be the
    # first prompt's object in view 0 and its last frame the second prompt's object in view 7.
    args = [*sets(TINY_OVERRIDES), "--threads", "1"]
    src, dst = "a red pyramid", "a cyan cube"
    succeeds(capsys, "generate", "--ckpt", trained_gen_ckpt, "--prompt", src, "--prompt", dst, "--out",
             tmp_path / "g", "--no-mesh", "--no-video", *args)
    succeeds(capsys, "interpolate", "--ckpt", trained_gen_ckpt, "--from", src, "--to", dst, "--steps", 8,
             "--out", tmp_path / "i.gif", *args)
    strip, side = tmp_path / "i.png", 32
    src_views = tmp_path / "g" / "00-a-red-pyramid" / "views.png"
    dst_views = tmp_path / "g" / "01-a-cyan-cube" / "views.png"
    assert np.abs(tile(strip, 0, side) - tile(src_views, 0, side)).mean() < 1.0
    assert np.abs(tile(strip, 7, side) - tile(dst_views, 7, side)).mean() < 1.0
    # ... and the two objects differ enough for those checks to mean something.
    assert np.abs(tile(strip, 7, side) - tile(src_views, 7, side)).mean() > 5.0


@pytest.mark.parametrize("args, expect", [
    (["--steps", "1"], ["--steps 1", "at least 2"]),
    (["--out", "interp.txt"], ["interp.txt", ".gif", ".mp4"]),
    (["--from", ""], ["empty prompt"]),
    (["--ckpt", "/no/such/ckpt"], ["/no/such/ckpt", "not a generator checkpoint"]),
])
def test_interpolate_mistakes_are_one_line(tmp_path, capsys, tiny_gen_ckpt, gen_args, args, expect):
    base = {"--ckpt": str(tiny_gen_ckpt), "--from": "a red cube", "--to": "a blue sphere", "--steps": "4",
            "--out": str(tmp_path / "interp.gif")}
    base.update(zip(args[::2], args[1::2]))
    if not base["--out"].startswith("/"):
        base["--out"] = str(tmp_path / base["--out"])
    err = refused(capsys, "interpolate", *[a for kv in base.items() for a in kv], *gen_args)
    assert all(w in err for w in expect), err
    assert not list(tmp_path.iterdir())


# ---- eval --------------------------------------------------------------------------------------------------------
def test_eval_refuses_a_checkpoint_with_another_field_layout(tmp_path, capsys, tiny_gen_ckpt, tiny_dataset,
                                                             tiny_generator):
    err = refused(capsys, "eval", "--ckpt", tiny_gen_ckpt, "--data", tiny_dataset, "--out", tmp_path / "ev",
                  "--threads", "1")
    # Both field configs are in the message, named after where they come from.
    ckpt_hash = P2NConfig().override(tiny_generator.FIELD).field.log2_hashmap_size
    data_hash = P2NConfig().override(TINY_OVERRIDES).field.log2_hashmap_size
    assert ckpt_hash != data_hash
    assert f"log2_hashmap_size: checkpoint {ckpt_hash} vs dataset {data_hash}" in err, err
    assert str(tiny_gen_ckpt) in err and str(tiny_dataset) in err and "field layout" in err, err
    assert not (tmp_path / "ev").exists()


def test_eval_rejects_a_folder_that_is_not_a_dataset(tmp_path, capsys, trained_gen_ckpt):
    err = refused(capsys, "eval", "--ckpt", trained_gen_ckpt, "--data", trained_gen_ckpt, "--out", tmp_path / "ev")
    assert "no p2n dataset" in err and "p2n dataset build" in err, err


def test_eval_writes_report_json_md_and_png(tmp_path, capsys, trained_gen_ckpt, tiny_dataset):
    out = tmp_path / "ev"
    rec = succeeds(capsys, "eval", "--ckpt", trained_gen_ckpt, "--data", tiny_dataset, "--max-objects", 2, "--out",
                   out, *sets(TINY_OVERRIDES), "--threads", "1")
    doc = json.loads((out / "report.json").read_text())
    summary = doc["summary"]
    assert rec["summary"] == summary
    # The groups and baselines p2n/evaluate.py documents; an image prompt has no caption, so no nearest baseline.
    assert {g: sorted(m) for g, m in summary.items()} == {"image": ["generated", "mean"],
                                                          "paraphrase": ["generated", "mean", "nearest"],
                                                          "unseen_combo": ["generated", "mean", "nearest"]}
    # --max-objects 2 per split: 2 training objects (one held-out paraphrase each), 2 held-out ones, all 4 by image.
    assert {(g, m): v["n"] for g, ms in summary.items() for m, v in ms.items()} == {
        ("image", "generated"): 4, ("image", "mean"): 4, ("paraphrase", "generated"): 2, ("paraphrase", "mean"): 2,
        ("paraphrase", "nearest"): 2, ("unseen_combo", "generated"): 2, ("unseen_combo", "mean"): 2,
        ("unseen_combo", "nearest"): 2}
    assert len(doc["rows"]) == 20
    assert all(math.isfinite(r["psnr"]) and 5 < r["psnr"] < 60 and 0 < r["ssim"] <= 1 for r in doc["rows"])
    # Each "nearest" row scores one training object's own fitted parameters on the evaluated object's views, and
    # no "mean" row does (a swapped or mislabelled row would fail). Which object is nearest depends on the text
    # encoder, here random-weight tiny-clip, so the test checks the kind of row rather than its rank.
    from p2n.data import open_dataset, row_params, row_views
    from p2n.nerf.render import composite, psnr

    gen = Generator.load(str(trained_gen_ckpt), P2NConfig().override(TINY_OVERRIDES))
    ds = open_dataset(str(tiny_dataset))
    fits = [row_params(r, gen.cfg.field)[0] for r in ds.rows(split="train")]
    rows_by_id = {r["object_id"]: r for r in ds.rows()}

    def fit_scores(object_id: str) -> list[float]:
        views = row_views(rows_by_id[object_id])
        gt = composite(views.images, gen.cfg.render.background)
        return [float(psnr(gen.render(p, views.cameras), gt).mean()) for p in fits]

    checked = 0
    for r in doc["rows"]:
        if r["group"] == "paraphrase" and r["method"] in ("nearest", "mean"):
            best = min(abs(r["psnr"] - x) for x in fit_scores(r["object_id"]))
            assert (best < 1e-3) == (r["method"] == "nearest"), (r, best)
            checked += 1
    assert checked == 4

    md = (out / "report.md").read_text()
    for g, ms in summary.items():
        for m, v in ms.items():
            assert f"| {g} | {m} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['n']} |" in md
    assert "![examples: truth | generated](report.png)" in md
    # 8 examples (the generated rows, capped at 8), each a truth | generated pair of 32 px views shown 2x.
    w, h = Image.open(out / "report.png").size
    assert h == 8 * (64 + 2) + 2 and w > 2 * (64 + 2), (w, h)


def test_eval_adds_lpips_and_clip_score_when_given_weights(tmp_path, capsys, trained_gen_ckpt, tiny_dataset):
    """--lpips-weights (a file in the reference package's layout; random AlexNet here) and --clip (tiny-clip: random
    weights, so the values mean nothing, but every row must carry them, computed as documented)."""
    from p2n.data import open_dataset, row_views
    from p2n.evaluate import clip_score
    from p2n.align import build_encoder
    from p2n.nerf.render import composite
    from p2n.perceptual import _CONVS, LPIPS, load_lpips

    torch.manual_seed(5)
    model = LPIPS()
    for p in model.lins.parameters():
        p.data.uniform_(0, 0.1)  # the reference's lin weights are non-negative
    state = {}
    for k, (name, *_) in enumerate(_CONVS):
        state[f"{name}.weight"], state[f"{name}.bias"] = model.convs[k].weight, model.convs[k].bias
        state[f"lin{k}.model.1.weight"] = model.lins[k].weight
    torch.save(state, tmp_path / "lpips_alex.pth")
    out = tmp_path / "ev"
    rec = succeeds(capsys, "eval", "--ckpt", trained_gen_ckpt, "--data", tiny_dataset, "--max-objects", 1,
                   "--split", "train", "--out", out, "--lpips-weights", tmp_path / "lpips_alex.pth",
                   "--clip", "tiny-clip", *sets(TINY_OVERRIDES), "--threads", "1")
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert rows and all(r["lpips"] >= 0 and 0 <= r["clip_score"] <= 100 for r in rows)
    assert all("lpips" in v and "clip_score" in v for ms in rec["summary"].values() for v in ms.values())
    # the "mean" row of the paraphrase group, recomputed with the public pieces
    gen = Generator.load(str(trained_gen_ckpt), P2NConfig().override(TINY_OVERRIDES))
    row = next(r for r in rows if r["group"] == "paraphrase" and r["method"] == "mean")
    views = row_views(next(r for r in open_dataset(str(tiny_dataset)).rows() if r["object_id"] == row["object_id"]))
    rgb = gen.render(gen.mean_params(), views.cameras)
    gt = composite(views.images, gen.cfg.render.background)
    with torch.no_grad():
        assert abs(float(load_lpips(tmp_path / "lpips_alex.pth")(rgb, gt).mean()) - row["lpips"]) < 1e-4
        assert abs(clip_score(build_encoder("tiny-clip"), rgb, row["prompt"]) - row["clip_score"]) < 1e-3
    md = (out / "report.md").read_text()
    assert "| LPIPS | CLIP score |" in md and "Not computed" not in md


# ---- help ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, flags", [
    ("generate", ["--ckpt", "--prompt", "--prompts-file", "--image", "--out", "--no-mesh", "--frames"]),
    ("interpolate", ["--ckpt", "--from", "--to", "--steps", "--out"]),
    ("eval", ["--ckpt", "--data", "--split", "--max-objects", "--out"]),
])
def test_help(command, flags):
    r = subprocess.run([sys.executable, "-m", "p2n", command, "--help"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: p2n {command}") and all(f in r.stdout for f in flags), r.stdout
