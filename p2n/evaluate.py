"""Evaluating a generator against a dataset: generated NeRFs vs ground-truth views, with baselines.

Groups: ``paraphrase`` (training objects prompted with held-out paraphrases never used in training),
``unseen_combo`` (held-out objects: colour x shape combinations never trained on), ``image`` (generation from one
of the object's own views). Baselines in the same table: ``mean`` (the decoded mean latent) and ``nearest`` (the
fitted NeRF of the training object whose caption embedding is nearest to the prompt). Metrics: PSNR, SSIM; LPIPS
when an LPIPS model is given (``p2n.perceptual``); CLIP score when a CLIP encoder is given: 100 x the cosine of
each render's image embedding with the prompt's text embedding, floored at 0, averaged over views (an image
prompt is scored against the object's first caption).

Does not own: the dataset format (``p2n.data``) or the models (``p2n.generate``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from p2n.errors import P2NError
from p2n.generate import Generator
from p2n.metrics import psnr, ssim
from p2n.nerf.params import layout_difference
from p2n.nerf.render import composite

METHODS = ("generated", "mean", "nearest")


class EvalError(P2NError):
    """A generator and a dataset that cannot be compared (e.g. different NeRF field layouts)."""


def check_same_field(gen: Generator, dataset) -> None:
    """Refuse a dataset fitted with another field layout than the checkpoint decodes to, before any work.

    The nearest-caption baseline renders the dataset's own parameters through the checkpoint's field; a generator
    is evaluated on the dataset (layout) it was trained on. Datasets without a manifest are checked per row."""
    ds_field = getattr(dataset, "field_config", None)
    if ds_field is None or ds_field.layout_hash() == gen.cfg.field.layout_hash():
        return
    diff = layout_difference(gen.cfg.field, ds_field, "checkpoint", "dataset")
    raise EvalError(f"checkpoint {gen.source or '(in memory)'} decodes NeRFs with another field layout than the "
                    f"dataset {getattr(dataset, 'uri', '')} was fitted with ({diff}); evaluate a generator on a "
                    "dataset fitted with the field config it was trained on")


@dataclass
class EvalReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    examples: list[tuple[str, Tensor, Tensor]] = field(default_factory=list)  # (prompt, gt [H,W,3], gen [H,W,3])

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for group in sorted({r["group"] for r in self.rows}):
            out[group] = {}
            for m in METHODS:
                rs = [r for r in self.rows if r["group"] == group and r["method"] == m]
                if rs:
                    out[group][m] = {"psnr": round(statistics.mean(r["psnr"] for r in rs), 3),
                                     "ssim": round(statistics.mean(r["ssim"] for r in rs), 4), "n": len(rs)}
                    for key in ("lpips", "clip_score"):
                        if all(key in r for r in rs):
                            out[group][m][key] = round(statistics.mean(r[key] for r in rs), 4)
        return out


def _score(gen: Generator, params: Tensor, views, lpips=None, clip=None, text: str = "") -> tuple[dict, Tensor]:
    rgb = gen.render(params, views.cameras)
    gt = composite(views.images, gen.cfg.render.background)
    scores = {"psnr": float(psnr(rgb, gt).mean()), "ssim": float(ssim(rgb, gt).mean())}
    with torch.no_grad():
        if lpips is not None:
            scores["lpips"] = float(lpips(rgb.clamp(0, 1), gt.clamp(0, 1)).mean())
        if clip is not None and text:
            scores["clip_score"] = clip_score(clip, rgb, text)
    return scores, rgb


def clip_score(clip, images: Tensor, text: str) -> float:
    """100 x max(cos(image, text), 0) averaged over ``images`` [N, H, W, 3] (CLIPScore without its 2.5 weight)."""
    img = clip.encode_image(images.clamp(0, 1))
    txt = clip.encode_text([text])
    return float((100 * (img @ txt[0]).clamp(min=0)).mean())


def evaluate_generator(gen: Generator, dataset, split: str | None = None, max_objects: int | None = None,
                       max_examples: int = 8, lpips=None, clip=None) -> EvalReport:
    """Score generation and baselines on ``dataset`` (a ``p2n.data.DatasetReader``). ``lpips``: a
    :class:`p2n.perceptual.LPIPS`; ``clip``: a prompt encoder that takes text and images (a CLIP)."""
    if clip is not None and not clip.supports_images:
        raise EvalError(f"the CLIP score needs an encoder of text and images; {clip.name} takes text only")
    from p2n.data import row_params, row_views

    check_same_field(gen, dataset)
    train_rows = list(dataset.rows(split="train"))
    captions = [(c, i) for i, r in enumerate(train_rows) for c in list(r["captions"])[:2]]
    with torch.no_grad():
        cap_emb = gen.text_encoder.encode_text([c for c, _ in captions]) if captions else None
    mean_params = gen.mean_params()
    report = EvalReport()
    groups: list[tuple[str, dict, str]] = []
    splits = [split] if split else ["train", "heldout"]
    for sp in splits:
        rows = list(dataset.rows(split=sp))[: max_objects or None]
        for r in rows:
            if sp == "train":
                for c in list(r["heldout_captions"])[:1]:
                    groups.append(("paraphrase", r, c))
            else:
                groups.append(("unseen_combo", r, list(r["captions"])[0]))
            groups.append(("image", r, ""))
    prompts = [p for g, _, p in groups if g != "image"]
    gen_text = gen.from_prompts(prompts).params if prompts else None
    k = 0
    for group, row, prompt in groups:
        views = row_views(row)
        if group == "image":
            if not gen.supports_images:
                continue
            ref = composite(views.images[:1], gen.cfg.render.background)
            p_gen = gen.from_images(ref).params[0]
            nearest = None
        else:
            p_gen = gen_text[k]
            k += 1
            nearest = None
            if cap_emb is not None:
                e = gen.text_encoder.encode_text([prompt])
                j = int((cap_emb @ e[0]).argmax())
                nearest, _ = row_params(train_rows[captions[j][1]], gen.cfg.field)
        text = prompt or (list(row["captions"]) or [""])[0]
        for method, p in (("generated", p_gen), ("mean", mean_params), ("nearest", nearest)):
            if p is None:
                continue
            scores, rgb = _score(gen, p, views, lpips, clip, text)
            report.rows.append({"group": group, "method": method, "object_id": row["object_id"],
                                "prompt": prompt or "(image)", **scores})
            if method == "generated" and len(report.examples) < max_examples:
                gt = composite(views.images[0], gen.cfg.render.background)
                report.examples.append((prompt or f"image of {row['object_id']}", gt, rgb[0]))
    return report
