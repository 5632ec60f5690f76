"""``p2n demo``: the whole pipeline, small enough for a 2-core laptop, writing pictures to ``--out``.

Stages (each writes under OUT/<stage>/; ``--stages`` picks a subset):
  dataset   the catalogue's first 32 single objects (one per colour x shape, canonical pose; 5 of them held out)
            fitted on a local Ray (2 workers) + turntables of two fitted objects
  train     stage 1 (VAE) then stage 2 (aligner) on Ray Train + DeepSpeed, 2 workers
  generate  prompts (training captions, an unseen paraphrase, an unseen colour x shape) → NeRFs, index.html gallery
  eval      generated vs mean-latent and nearest-caption baselines on held-out paraphrases and combinations
  refine    a held-out object refined (multiview) from the generated NeRF and from scratch: curve.png
  serve     Ray Serve on 127.0.0.1 with the demo checkpoint, one POST /v1/generate over HTTP, then stopped

The demo runs a smaller config than the defaults (``DEMO_OVERRIDES``) so the whole pipeline fits in minutes on a
2-core CPU; ``--set`` overrides it further. Singles only: at 32 objects, mixing in two-object scenes (as the
defaults do) left 9 single objects to learn colour and shape words from, and a prompt as plain as "a red cube"
came out a dark green blob (15.7 dB); with 27 training singles it is a red cube. The VAE gets 400 steps at
lr 4e-3 (defaults 300 / 3e-3): measured on this dataset in one process, that decodes the training objects at
their fitted PSNR (gap -0.01 dB vs 3.3 dB) and held-out ones 0.2 dB better.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from p2n.cli.common import add_config_args, config_from_args, print_json

DEMO_OVERRIDES = [
    "scene.image_size=32", "scene.num_train_views=24", "scene.num_test_views=6",
    "fit.steps=120", "fit.target_psnr=null", "dataset.num_objects=32", "dataset.include_pairs=false",
    "dataset.workers=2", "vae.steps=400", "vae.lr=4e-3",
]


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a local machine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of: {', '.join(STAGES)}")
    add_config_args(p)
    p.set_defaults(func=run)


def stage_dataset(out: Path, cfg, summary: dict) -> None:
    import importlib

    from p2n.data import open_dataset, row_params
    from p2n.export import save_turntable

    job = importlib.import_module("ray_jobs.build_dataset")  # the Ray adapter; p2n itself never imports ray
    resume = (out / "manifest.json").exists()
    res = job.build(str(out), cfg, resume=resume, progress=True)
    ds = open_dataset(str(out))
    rows = list(ds.rows(split="train"))[:2]
    turntables = []
    for r in rows:
        params, _ = row_params(r, cfg.field)
        path = out / f"turntable-{r['object_id'].replace('/', '_')}.gif"
        save_turntable(params, cfg, path)
        turntables.append(str(path))
    summary["dataset"] = {"uri": str(out), "ok": res.get("ok", res.get("num_ok")), "summary": res,
                          "turntables": turntables}
    print(f"[demo] dataset at {out}: {json.dumps(res)[:300]}", flush=True)


def stage_train(out: Path, cfg, summary: dict) -> None:
    import importlib

    job = importlib.import_module("ray_jobs._train_common")  # the Ray adapter; p2n itself never imports ray
    data = summary.get("dataset", {}).get("uri") or str(out.parent / "dataset")
    res_vae = job.train("vae", data, str(out / "vae"), cfg, workers=2, resume=(out / "vae").exists())
    res_align = job.train("align", data, str(out / "align"), cfg, vae_uri=str(out / "vae"), workers=2,
                          resume=(out / "align").exists())
    summary["train"] = {"vae": res_vae, "align": res_align, "ckpt": str(out / "align")}


def _demo_prompts(cfg) -> list[tuple[str, str]]:
    """(kind, prompt): training captions, an unseen paraphrase of a training object, an unseen combination."""
    from p2n.scenes import catalogue

    objs = catalogue(cfg.scene, cfg.dataset.num_objects, include_pairs=cfg.dataset.include_pairs)
    train = [o for o in objs if o.split == "train"]
    held = [o for o in objs if o.split == "heldout"]
    out = [("training caption", o.captions[0]) for o in train[:3]]
    out += [("unseen paraphrase", o.heldout_captions[0]) for o in train[:2]]
    out += [("unseen combination", o.captions[0]) for o in held[:2]]
    return out


def stage_generate(out: Path, cfg, summary: dict) -> None:
    import html

    from p2n.export import save_mesh
    from p2n.generate import Generator
    from p2n.viz import image_grid, save_animation

    ckpt = summary.get("train", {}).get("ckpt") or str(out.parent / "train" / "align")
    gen = Generator.load(ckpt, cfg)
    prompts = _demo_prompts(cfg)
    res = gen.from_prompts([p for _, p in prompts])
    out.mkdir(parents=True, exist_ok=True)
    cards = []
    for i, ((kind, prompt), params) in enumerate(zip(prompts, res.params)):
        frames = gen.render(params, gen.ring(24, 64))
        save_animation(frames, out / f"{i:02d}.gif")
        image_grid([list(frames[::3])]).save(out / f"{i:02d}.png")
        try:
            save_mesh(params, gen.cfg, out / f"{i:02d}", resolution=64)
        except Exception as e:  # an empty field has no surface; the gallery still shows the renders
            print(f"[demo] no mesh for {prompt!r}: {e}", flush=True)
        cards.append(f'<figure><img src="{i:02d}.gif" width="160"><figcaption><b>{html.escape(prompt)}</b><br>'
                     f'<i>{kind}</i> · <a href="{i:02d}.glb">mesh</a></figcaption></figure>')
    (out / "index.html").write_text("<!doctype html><meta charset=utf-8><title>p2n demo</title>"
                                    "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px}"
                                    "</style><h1>p2n: prompt → NeRF in one forward pass</h1>"
                                    f"<p>{len(prompts)} prompts in one batch: {res.generate_ms:.1f} ms</p>"
                                    + "".join(cards))
    summary["generate"] = {"gallery": str(out / "index.html"), "generate_ms": round(res.generate_ms, 2),
                           "prompts": prompts}


def stage_eval(out: Path, cfg, summary: dict) -> None:
    from p2n.cli import build_parser

    ckpt = summary.get("train", {}).get("ckpt") or str(out.parent / "train" / "align")
    data = summary.get("dataset", {}).get("uri") or str(out.parent / "dataset")
    # Through `p2n eval`'s own parser, so every flag it has gets its default here too.
    ns = build_parser().parse_args(["eval", "--ckpt", ckpt, "--data", data, "--max-objects", "8", "--out", str(out),
                                    *[a for o in DEMO_OVERRIDES for a in ("--set", o)]])
    ns.func(ns)
    summary["eval"] = json.loads((out / "report.json").read_text())["summary"]


def stage_refine(out: Path, cfg, summary: dict) -> None:
    from p2n.generate import Generator
    from p2n.refine import compare_inits
    from p2n.scenes import catalogue

    ckpt = summary.get("train", {}).get("ckpt") or str(out.parent / "train" / "align")
    gen = Generator.load(ckpt, cfg)
    objs = catalogue(cfg.scene, cfg.dataset.num_objects, include_pairs=cfg.dataset.include_pairs)
    held = [o for o in objs if o.split == "heldout"]
    target = (held or objs)[0].object_id
    out.mkdir(parents=True, exist_ok=True)
    res = compare_inits(target, gen.cfg, 120, out / "curve.png", gen)
    summary["refine"] = {"object_id": target, "curve": str(out / "curve.png"),
                         "result": {k: _brief(v) for k, v in res.items()}}


def _brief(r) -> dict:
    return {"psnr_start": round(float(r.psnr_start), 2), "psnr_test": round(float(r.psnr_test), 2),
            "steps": r.steps, "seconds": round(r.seconds, 1)}


def stage_serve(out: Path, cfg, summary: dict) -> None:
    import time as _t

    import httpx

    from p2n.cli.serve import load_serve_app

    app = load_serve_app()  # the Ray Serve adapter; p2n itself never imports ray
    ckpt = summary.get("train", {}).get("ckpt") or str(out.parent / "train" / "align")
    url = app.start(ckpt, "127.0.0.1", 8765, overrides=list(DEMO_OVERRIDES), store=str(out / "store"),
                    log_level="WARNING")
    try:
        t = _t.perf_counter()
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a red cube", "outputs": ["params", "views"]},
                       timeout=120)
        ms = (_t.perf_counter() - t) * 1000
        r.raise_for_status()
        body = r.json()
        out.mkdir(parents=True, exist_ok=True)
        (out / "response.json").write_text(json.dumps({k: v for k, v in body.items() if k != "items"}, indent=1))
        summary["serve"] = {"url": url, "status": r.status_code, "request_ms": round(ms, 1),
                            "timings": body.get("timings")}
    finally:
        app.stop()


STAGES = {"dataset": stage_dataset, "train": stage_train, "generate": stage_generate, "eval": stage_eval,
          "refine": stage_refine, "serve": stage_serve}


def run(args: argparse.Namespace) -> int:
    args.overrides = DEMO_OVERRIDES + list(args.overrides)
    cfg = config_from_args(args)
    out = Path(args.out).resolve()  # Ray workers run elsewhere: every path they get is absolute
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        from p2n.errors import P2NError

        raise P2NError(f"unknown demo stage(s) {unknown}; choose from {list(STAGES)}")
    summary: dict = {"out": str(out)}
    t0 = time.perf_counter()
    for name in chosen:
        ts = time.perf_counter()
        print(f"[demo] stage {name} ...", flush=True)
        STAGES[name](out / name, cfg, summary)
        summary.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - ts, 1)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_json(summary)
    return 0
