"""The refinement loop: one optimiser over a NeRF parameter vector, driven by any registered guidance.

Each step asks a *ray source* for rays, renders them differentiably with ``p2n.nerf.render.render_rays`` and hands
the colours to the guidance, whose loss gradient flows back into the flat parameter vector:

- ``multiview`` (posed views, ``multiview.PosedViews``): random pixels of the training views over random
  backgrounds inside a silhouette-carved occupancy grid, plus the empty-space penalty — the reconstruction case;
- every other guidance (``sds``, ``zero123``, ``clip``, ...): ``RandomViews`` renders ``views_per_step`` whole
  ``image_size`` views from random cameras on a sphere around the object (configured radius, elevation band) and
  passes them with a ``GuidanceContext`` (prompt, reference image, each view's elevation / azimuth / radius).

Adam with a warm-up and an exponential decay, occupancy refreshes from the running density, held-out PSNR every
``eval_every`` steps whenever the target has ground truth, and a checkpoint every ``checkpoint_every`` steps in
``ckpt/`` (parameters, optimiser moments, RNG and grid state as safetensors, the curve as JSON): a resumed run
continues at the saved step and ends exactly where an uninterrupted one would.

:func:`refine_object` is the one-call form (initialization + loop + files); :func:`compare_inits` runs several
initializations on one object and draws their curves in one PNG.

Does not own: the guidances (``p2n.refine.guidance``), initializations (``init.py``), targets (``target.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from p2n.cameras import random_rig, rays
from p2n.config import P2NConfig, resolve_device
from p2n.errors import P2NError
from p2n.malloc import keep_freed_memory
from p2n.nerf.field import NeRFField
from p2n.nerf.fit import evaluate
from p2n.nerf.params import check_finite, load_params, save_params
from p2n.nerf.render import OccupancyGrid, render_rays, sample_step
from p2n.refine.guidance import (
    GUIDANCES,
    Guidance,
    GuidanceContext,
    GuidanceInputError,
    UnknownGuidance,
    build_guidance,
)
from p2n.refine.init import GeneratorLike, initial_params
from p2n.refine.multiview import PosedViews, ViewBatch
from p2n.refine.target import RefineTarget, camera_angles

CKPT_DIR = "ckpt"
CKPT_FORMAT = "p2n.refine.ckpt"
_TABLE = "encoding.table"


class RefineError(P2NError):
    """A refinement that cannot run or diverged (NaN parameters), or a checkpoint that does not fit this run."""


@dataclass
class RefineResult:
    params: Tensor  # [P] float32, CPU
    curve: list[dict]  # one record per step (step 0 = the initialization): loss, lr, seconds, psnr_test at evals
    seconds: float  # optimisation time (evaluations and checkpoints excluded), summed over resumed runs
    steps: int = 0  # the last step run
    psnr_start: float = float("nan")  # held-out PSNR of the initialization (nan without ground truth)
    psnr_test: float = float("nan")  # at the last evaluation
    reached_step: int | None = None  # first evaluated step with psnr_test >= stop_at_psnr
    start_step: int = 0  # > 0 when resumed from a checkpoint
    meta: dict = field(default_factory=dict)

    def evaluations(self) -> list[dict]:
        return [r for r in self.curve if "psnr_test" in r]


def _num(x):
    """NaN / inf as None (recursively), so the JSON we write stays strict."""
    if isinstance(x, dict):
        return {k: _num(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_num(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def smooth(values: list[float], alpha: float = 0.5) -> list[float]:
    """Exponential moving average (the "smoothed" curve that must rise steadily)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * out[-1] + (1 - alpha) * v)
    return out


# ---- ray sources -------------------------------------------------------------------------------------------------

class RandomViews:
    """Whole small views from random cameras around the object: the rays of the image guidances."""

    def __init__(self, target: RefineTarget, cfg: P2NConfig, device: torch.device):
        self.target, self.cfg, self.device = target, cfg, device
        rc = cfg.refine
        self.radius = rc.camera_radius or cfg.scene.camera_radius
        self.fov = rc.fov_deg or cfg.scene.fov_deg
        if rc.min_elevation_deg > rc.max_elevation_deg or not -90 <= rc.min_elevation_deg <= 90 \
                or not -90 <= rc.max_elevation_deg <= 90:
            raise RefineError(f"elevation band [{rc.min_elevation_deg}, {rc.max_elevation_deg}] must be ordered and "
                              "within [-90, 90] degrees")
        self.grid = None  # built from the initial parameters' density by the loop

    def sample(self, generator: torch.Generator) -> ViewBatch:
        rc = self.cfg.refine
        b, s = rc.views_per_step, rc.image_size
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        cams = random_rig(b, seed, self.radius, rc.min_elevation_deg, rc.max_elevation_deg, s, s, self.fov)
        o, d = rays(cams)
        if rc.background == "random":
            bg = torch.rand((b, 3), generator=generator)
        else:
            bg = torch.tensor(self.cfg.render.background, dtype=torch.float32).expand(b, 3)
        bg = bg[:, None, None, :].expand(b, s, s, 3).reshape(-1, 3)
        el, az, r = camera_angles(cams)
        t = self.target
        ctx = GuidanceContext(prompt=t.prompt, ref_image=t.ref_image, elevation_deg=el, azimuth_deg=az, radius=r,
                              ref_elevation_deg=t.ref_elevation_deg, ref_azimuth_deg=t.ref_azimuth_deg,
                              ref_radius=t.ref_radius)
        dev = self.device
        return ViewBatch(o.reshape(-1, 3).to(dev), d.reshape(-1, 3).to(dev), bg.to(dev), (b, s, s), ctx)

    def regularizer(self, nerf, params, generator) -> None:
        return None


def resolve_guidance(guidance: str | Guidance, cfg: P2NConfig) -> Guidance:
    if isinstance(guidance, str):
        if guidance not in GUIDANCES:
            raise UnknownGuidance(f"unknown guidance {guidance!r}; choose one of: {', '.join(sorted(GUIDANCES))}")
        return build_guidance(guidance, cfg.refine.guidance)
    return guidance


def _ray_source(guidance: Guidance, target: RefineTarget, cfg: P2NConfig, device: torch.device):
    if getattr(guidance, "needs_posed_views", False):
        if target.train is None:
            raise RefineError(f"the {guidance.name} guidance fits posed views, and {target.name!r} has none; "
                              "give --data DIR (a transforms.json folder) or --scene CAPTION")
        return PosedViews(target.train, cfg, device)
    return RandomViews(target, cfg, device)


def _check_context(guide: Guidance, source) -> None:
    """Fail before the first step (and with a hint about the command line) when the target lacks what the guidance
    conditions on: sds needs a prompt, zero123 a reference image."""
    check = getattr(guide, "check_context", None)
    if check is None or not isinstance(source, RandomViews):
        return
    batch = source.sample(torch.Generator().manual_seed(0))
    try:
        check(batch.ctx, batch.shape[0])
    except GuidanceInputError as e:
        raise RefineError(f"{e}; for {source.target.name!r}: a prompt comes from --prompt, --scene or a --data "
                          "folder with captions, a reference image from --image, --scene or --data") from None


def lr_at(step: int, total: int, cfg: P2NConfig) -> float:
    """Learning rate of step ``step`` (1-based) of ``total``: linear warm-up, then exponential decay."""
    rc = cfg.refine
    decay = rc.lr_final_factor ** ((step - 1) / max(total, 1))
    warm = min(1.0, step / rc.warmup_steps) if rc.warmup_steps > 0 else 1.0
    return rc.lr * decay * warm


def _eval_subset(target: RefineTarget, cfg: P2NConfig):
    if not target.has_ground_truth:
        return None
    test = target.test
    k = cfg.refine.eval_views
    if k is None or k >= len(test):
        return test
    return test[[round(i * len(test) / k) for i in range(k)]]


# ---- checkpoints -------------------------------------------------------------------------------------------------

@dataclass
class _State:
    step: int
    params: Tensor
    opt: dict[str, Tensor]  # exp_avg, exp_avg_sq, step
    rng_loop: Tensor
    rng_guidance: Tensor | None
    grid: dict[str, Tensor]  # density, occupied, allowed
    curve: list[dict]
    seconds: float
    ema: float | None
    psnr_start: float
    total_steps: int


def _run_key(guidance: Guidance, cfg: P2NConfig) -> dict:
    return {"guidance": guidance.name, "layout_hash": cfg.field.layout_hash(), "seed": cfg.refine.seed}


def save_checkpoint(ckpt_dir: Path, state: _State, key: dict, cfg: P2NConfig) -> None:
    """Write ``ckpt_dir`` atomically (a sibling temp folder swapped in), so a crash never leaves half a checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=ckpt_dir.name + ".tmp-", dir=ckpt_dir.parent))
    meta = {"step": state.step}
    save_params(tmp / "params.safetensors", state.params, cfg.field, meta)
    tensors = {f"adam.{k}": v.detach().cpu().contiguous() for k, v in state.opt.items()}
    tensors["rng.loop"] = state.rng_loop
    if state.rng_guidance is not None:
        tensors["rng.guidance"] = state.rng_guidance
    tensors.update({f"grid.{k}": v.detach().cpu().contiguous() for k, v in state.grid.items()})
    save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": CKPT_FORMAT, "step": str(state.step)})
    doc = {"format": CKPT_FORMAT, "step": state.step, "total_steps": state.total_steps, **key,
           "seconds": state.seconds, "ema": state.ema, "psnr_start": _num(state.psnr_start), "curve": _num(state.curve)}
    (tmp / "state.json").write_text(json.dumps(doc))
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: Path, key: dict, cfg: P2NConfig) -> _State | None:
    """The state in ``ckpt_dir`` (or the ``.old`` copy a crash mid-swap left), None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.json").is_file():
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if not (old / "state.json").is_file():
            return None
        ckpt_dir = old
    try:
        doc = json.loads((ckpt_dir / "state.json").read_text())
        tensors = load_file(str(ckpt_dir / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise RefineError(f"{ckpt_dir}: unreadable checkpoint ({e}); delete it to start over") from None
    if doc.get("format") != CKPT_FORMAT:
        raise RefineError(f"{ckpt_dir}: not a p2n refinement checkpoint")
    for k, v in key.items():
        if doc.get(k) != v:
            raise RefineError(f"{ckpt_dir} was written by a run with {k}={doc.get(k)!r}, this run has {k}={v!r}; "
                              "resume with the same settings or write to another --out")
    params, _, meta = load_params(ckpt_dir / "params.safetensors", cfg.field)
    if int(meta.get("step", -1)) != doc["step"]:
        raise RefineError(f"{ckpt_dir}: params.safetensors (step {meta.get('step')}) and state.json (step "
                          f"{doc['step']}) disagree; delete the checkpoint to start over")
    return _State(step=int(doc["step"]), params=params,
                  opt={k[5:]: v for k, v in tensors.items() if k.startswith("adam.")},
                  rng_loop=tensors["rng.loop"], rng_guidance=tensors.get("rng.guidance"),
                  grid={k[5:]: v for k, v in tensors.items() if k.startswith("grid.")},
                  curve=doc["curve"], seconds=float(doc["seconds"]), ema=doc.get("ema"),
                  psnr_start=float("nan") if doc.get("psnr_start") is None else float(doc["psnr_start"]),
                  total_steps=int(doc["total_steps"]))


# ---- the loop ----------------------------------------------------------------------------------------------------

def _grad_norms(nerf: NeRFField, grad: Tensor | None) -> dict[str, float]:
    if grad is None:
        return {"grad_table": 0.0, "grad_mlp": 0.0}
    a, b = nerf.layout.offsets()[_TABLE]
    return {"grad_table": float(grad[a:b].norm()), "grad_mlp": float(torch.cat([grad[:a], grad[b:]]).norm())}


def refine(init: Tensor, guidance: str | Guidance, target: RefineTarget, cfg: P2NConfig, steps: int | None = None,
           ckpt_dir: str | Path | None = None, resume: bool = False, stop_at_psnr: float | None = None,
           progress: bool = False, on_step: Callable[[int, dict], None] | None = None) -> RefineResult:
    """Refine ``init`` [P] towards ``target`` with ``guidance`` (a registered name or a built guidance).

    ``steps`` defaults to ``cfg.refine.steps``. With ``ckpt_dir`` a checkpoint is written every
    ``cfg.refine.checkpoint_every`` steps and at the end; ``resume`` continues from it (a fresh start when there is
    none). ``stop_at_psnr`` ends the run at the first evaluation whose held-out PSNR reaches it. ``on_step(step,
    record)`` sees every step's record (raising from it interrupts the run, e.g. to test resuming).
    """
    rc = cfg.refine
    steps = rc.steps if steps is None else int(steps)
    if steps < 0:
        raise RefineError(f"steps={steps} must be >= 0")
    if rc.num_threads:
        torch.set_num_threads(rc.num_threads)
    keep_freed_memory()
    guide = resolve_guidance(guidance, cfg)
    dev = torch.device(resolve_device(rc.device))
    nerf = NeRFField(cfg.field)
    if init.numel() != nerf.num_params:
        raise RefineError(f"initial parameters have {init.numel()} values, the field needs {nerf.num_params}")
    source = _ray_source(guide, target, cfg, dev)
    _check_context(guide, source)
    eval_views = _eval_subset(target, cfg)
    step_size = sample_step(cfg.field.aabb_scale, cfg.render.num_samples)
    key = _run_key(guide, cfg)

    gen = torch.Generator().manual_seed(rc.seed)
    params = init.detach().float().clone().to(dev).requires_grad_(True)
    opt = torch.optim.Adam([params], lr=rc.lr, betas=(0.9, 0.99), eps=1e-15)
    grid = source.grid if source.grid is not None else OccupancyGrid.from_params(nerf, params.detach(), cfg.render)

    def psnr_now() -> float:
        if eval_views is None:
            return float("nan")
        v = evaluate(params.detach(), eval_views, cfg)
        return float(sum(v) / len(v))

    start, seconds, ema, curve = 0, 0.0, None, []
    state = load_checkpoint(Path(ckpt_dir), key, cfg) if (resume and ckpt_dir is not None) else None
    if state is not None:
        start, seconds, ema, curve, psnr_start = state.step, state.seconds, state.ema, state.curve, state.psnr_start
        with torch.no_grad():
            params.copy_(state.params.to(dev))
        if state.opt:
            sd = opt.state_dict()
            sd["state"] = {0: {k: v.to(dev) if k != "step" else v for k, v in state.opt.items()}}
            opt.load_state_dict(sd)
        gen.set_state(state.rng_loop)
        if state.rng_guidance is not None and getattr(guide, "generator", None) is not None:
            guide.generator.set_state(state.rng_guidance)
        grid.density, grid.occupied, grid.allowed = (state.grid[k].to(dev) for k in ("density", "occupied", "allowed"))
    else:
        psnr_start = psnr_now()
        curve.append({"step": 0, "seconds": 0.0, **({} if math.isnan(psnr_start) else {"psnr_test": psnr_start})})

    def snapshot(step: int) -> _State:
        st = opt.state.get(params, {})
        guide_gen = getattr(guide, "generator", None)
        return _State(step=step, params=params.detach().cpu(), opt=dict(st), rng_loop=gen.get_state(),
                      rng_guidance=None if guide_gen is None else guide_gen.get_state(),
                      grid={"density": grid.density, "occupied": grid.occupied, "allowed": grid.allowed},
                      curve=curve, seconds=seconds, ema=ema, psnr_start=psnr_start, total_steps=steps)

    reached = 0 if (stop_at_psnr is not None and psnr_start >= stop_at_psnr) else None
    bar = None
    if progress and start < steps and reached is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"refine {guide.name}", unit="step", leave=False)
    step = start
    psnr_last = next((r["psnr_test"] for r in reversed(curve) if "psnr_test" in r), float("nan"))
    for step in range(start + 1, steps + 1) if reached is None else ():
        t0 = time.perf_counter()
        lr = lr_at(step, steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = source.sample(gen)
        out = render_rays(nerf, params, batch.rays_o, batch.rays_d, batch.background, cfg.render, grid, jitter=gen)
        images = out["rgb"].reshape(*batch.shape, 3)
        res = guide(images, batch.ctx, step - 1, steps)
        loss = res.loss
        reg = source.regularizer(nerf, params, gen)
        if reg is not None:
            loss = loss + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms = _grad_norms(nerf, params.grad)
        opt.step()
        if not torch.isfinite(params).all():
            raise RefineError(f"refinement diverged at step {step} (NaN parameters); lower refine.lr (now {rc.lr})")
        if step % rc.occupancy_update_every == 0:
            grid.update(nerf, params, step_size, cfg.render.occupancy_threshold, rc.occupancy_decay, gen)
        seconds += time.perf_counter() - t0
        rec = {"step": step, "loss": float(loss.detach()), "lr": lr, "seconds": seconds, **norms,
               **{k: float(v) for k, v in res.info.items()}}
        if "psnr_batch" in rec:
            ema = rec["psnr_batch"] if ema is None else 0.9 * ema + 0.1 * rec["psnr_batch"]
            rec["psnr_train"] = ema
        if eval_views is not None and ((rc.eval_every and step % rc.eval_every == 0) or step == steps):
            psnr_last = rec["psnr_test"] = psnr_now()
            if stop_at_psnr is not None and psnr_last >= stop_at_psnr:
                reached = step
        curve.append(rec)
        if on_step:
            on_step(step, rec)
        if bar:
            bar.update(1)
            shown = {"loss": f"{rec['loss']:.4g}"}
            if not math.isnan(psnr_last):
                shown["psnr"] = f"{psnr_last:.1f}"
            bar.set_postfix(**shown)
        if reached is not None:
            break
        if ckpt_dir is not None and rc.checkpoint_every and step % rc.checkpoint_every == 0 and step < steps:
            save_checkpoint(Path(ckpt_dir), snapshot(step), key, cfg)
    if bar:
        bar.close()
    if ckpt_dir is not None:
        save_checkpoint(Path(ckpt_dir), snapshot(step), key, cfg)
    final = params.detach().cpu()
    try:
        check_finite(final)
    except P2NError as e:
        raise RefineError(str(e)) from None
    return RefineResult(params=final, curve=curve, seconds=seconds, steps=step, psnr_start=psnr_start,
                        psnr_test=psnr_last, reached_step=reached, start_step=start,
                        meta={"guidance": guide.name, "target": target.name, "total_steps": steps})


# ---- one object, with files --------------------------------------------------------------------------------------

def plot_curve(curves: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """One PNG: held-out PSNR per step of each labelled curve (top, when any has it) over its smoothed loss
    (bottom)."""
    from PIL import Image

    from p2n.viz import plot_curves

    path = Path(path)
    panels = []
    with tempfile.TemporaryDirectory() as tmp:
        psnr = {k: ([r["step"] for r in c if "psnr_test" in r], [r["psnr_test"] for r in c if "psnr_test" in r])
                for k, c in curves.items()}
        if any(len(xs) for xs, _ in psnr.values()):
            plot_curves(psnr, Path(tmp) / "psnr.png", ylabel="held-out PSNR (dB)", title=title)
            panels.append(Image.open(Path(tmp) / "psnr.png").copy())
        loss = {k: ([r["step"] for r in c if "loss" in r], smooth([r["loss"] for r in c if "loss" in r], 0.9))
                for k, c in curves.items()}
        if any(len(xs) for xs, _ in loss.values()) or not panels:
            plot_curves(loss, Path(tmp) / "loss.png", ylabel="loss (EMA 0.9)", title=title)
            panels.append(Image.open(Path(tmp) / "loss.png").copy())
    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), (255, 255, 255))
    y = 0
    for p in panels:
        canvas.paste(p, (0, y))
        y += p.height
    canvas.save(path)
    return path


def write_outputs(result: RefineResult, cfg: P2NConfig, out_dir: str | Path, meta: dict | None = None) -> None:
    """params.safetensors, curve.json, curve.png, turntable.gif and config.yaml in ``out_dir``."""
    from p2n.export import save_turntable

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**result.meta, **(meta or {}), "steps": result.steps, "seconds": result.seconds,
            "psnr_start": _num(result.psnr_start), "psnr_test": _num(result.psnr_test)}
    save_params(out / "params.safetensors", result.params, cfg.field, {k: v for k, v in meta.items() if v is not None})
    (out / "curve.json").write_text(json.dumps(_num({**meta, "curve": result.curve}), indent=1))
    plot_curve({meta.get("init", "refine"): result.curve}, out / "curve.png",
               title=f"{meta.get('init', '')} + {meta.get('guidance', '')}: {meta.get('target', '')}")
    save_turntable(result.params, cfg, out / "turntable.gif")
    cfg.to_yaml(out / "config.yaml")


def refine_object(init: str, guidance: str | Guidance, target: RefineTarget | str, cfg: P2NConfig,
                  steps: int | None = None, out_dir: str | Path | None = None,
                  generator: GeneratorLike | None = None, resume: bool = False, stop_at_psnr: float | None = None,
                  progress: bool = False) -> RefineResult:
    """Initialise (``generated`` / ``mean`` / ``scratch``), refine, and — with ``out_dir`` — write
    params.safetensors, curve.json, curve.png, turntable.gif (and checkpoints in ``out_dir/ckpt``). ``target`` may
    be a procedural caption or id."""
    from p2n.refine.target import from_scene

    if isinstance(target, str):
        target = from_scene(target, cfg)
    start = initial_params(init, cfg, target, generator)
    ckpt = Path(out_dir) / CKPT_DIR if out_dir is not None else None
    res = refine(start, guidance, target, cfg, steps, ckpt_dir=ckpt, resume=resume, stop_at_psnr=stop_at_psnr,
                 progress=progress)
    res.meta["init"] = init
    if out_dir is not None:
        write_outputs(res, cfg, out_dir)
    return res


def compare_inits(target: RefineTarget | str, cfg: P2NConfig, steps: int | None, out_png: str | Path,
                  generator: GeneratorLike | None = None, inits: tuple[str, ...] = ("generated", "scratch"),
                  guidance: str = "multiview", progress: bool = False) -> dict[str, RefineResult]:
    """Refine one object from each of ``inits`` with the same seeds and draw their curves in one PNG."""
    from p2n.refine.target import from_scene

    if isinstance(target, str):
        target = from_scene(target, cfg)
    results = {i: refine_object(i, guidance, target, cfg, steps, generator=generator, progress=progress)
               for i in inits}
    plot_curve({i: r.curve for i, r in results.items()}, out_png, title=f"{guidance}: {target.name}")
    return results
