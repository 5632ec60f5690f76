"""Stage 2 training: the aligner from prompt embeddings to the frozen VAE's latents, on this worker's objects.

Setup (once per worker): the frozen VAE encodes each object's fitted parameters to its posterior mean ``mu``;
the latent statistics (mean/std over *all* training objects, reduced across workers) standardise the targets;
the frozen encoders embed every training caption (``captions``) and every stored view but the last (composited
over ``render.background``) — the last view of each object and all ``heldout_captions`` are never trained on.

Per step: a seeded batch of ``align.batch_size`` prompts, ``align.image_fraction`` of them images, both
modalities through the aligner in one pass; loss = MSE to the standardised ``mu`` (+ ``align.render_weight`` x
decoded-render MSE through the frozen VAE decoder).

Evaluation (training objects of this worker, then the held-out split): render PSNR against the object's views of
the object generated from a training caption, from each unseen paraphrase, from the unseen view, of the mean
latent (the baseline a prompt must beat) and of the VAE's own reconstruction (the ceiling); plus top-1 retrieval
of the right object among all training latents.

Does not own: the aligner (``p2n.align.aligner``), the loop (``loop.py``), Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from p2n.align.aligner import Aligner, PromptEncoder, aligner_from_tensors, build_encoders, save_aligner
from p2n.align.aligner import KIND as ALIGN_KIND
from p2n.config import P2NConfig
from p2n.data import storage
from p2n.latent.checkpoint import load_file, resolve
from p2n.latent.vae import FILENAME as VAE_FILENAME
from p2n.latent.vae import VAEModel
from p2n.nerf.field import NeRFField
from p2n.nerf.render import OccupancyGrid, composite, psnr, render_image
from p2n.train.data import ObjectRecord, TrainError, all_sum, sample_indices, step_generator
from p2n.train.engine import lr_at, make_engine
from p2n.train.losses import RayBank, render_loss
from p2n.train.loop import MODEL_FILE, Stage
from p2n.train.metrics import Averager, render_psnr, view_subset, write_run_files

STD_FLOOR = 1e-6


def jitter(emb: Tensor, sigma: float, gen: torch.Generator) -> Tensor:
    """Training-time noise on prompt embeddings: each row moves by a random vector of length ~``sigma``, then gets
    its own norm back. A paraphrase embeds near, not on, the captions the aligner saw; without this the aligner
    maps those neighbourhoods to blends of objects."""
    if sigma <= 0:
        return emb
    norm = emb.norm(dim=1, keepdim=True)
    noisy = emb + sigma * torch.randn(emb.shape, generator=gen).to(emb) / emb.shape[1] ** 0.5
    return noisy * (norm / noisy.norm(dim=1, keepdim=True).clamp(min=1e-12))


def embedding_spread(emb: Tensor, comm_device: torch.device | str) -> float:
    """Mean distance of the training caption embeddings (every worker's) from their centroid: the unit of
    ``align.text_noise``, so one setting means the same for encoders whose captions sit closer together or
    further apart (measured: minilm 0.79, tiny-clip 0.50 on unit-norm embeddings)."""
    e = emb.double().cpu()
    n = all_sum(torch.tensor([float(len(e))], dtype=torch.float64), comm_device)
    centroid = all_sum(e.sum(0), comm_device) / n
    return float(all_sum((e - centroid).norm(dim=1).sum().reshape(1), comm_device) / n)


class AlignStage(Stage):
    name = "align"

    def __init__(self, cfg: P2NConfig, train: list[ObjectRecord], val: list[ObjectRecord], vae: VAEModel,
                 device: torch.device | str = "cpu", info: dict[str, Any] | None = None,
                 vae_uri: str | None = None,
                 encoders: tuple[PromptEncoder, PromptEncoder | None] | None = None):
        super().__init__()
        self.cfg = dataclasses.replace(cfg, field=vae.field)  # the field the VAE decodes to
        self.device, self.vae_uri = torch.device(device), vae_uri
        ac = cfg.align
        self.steps = ac.steps
        self.train_records, self.val_records = train, val
        if not train:
            raise TrainError(f"worker {self.rank} of {self.world} holds no training objects; use at most as many "
                             "workers as the dataset has training objects")
        self.vae = vae.to(self.device).eval()
        for p in self.vae.parameters():
            p.requires_grad_(False)
        self.text_encoder, self.image_encoder = encoders or build_encoders(ac, self.device)
        self.info = dict(info or {})

        # targets: the VAE's posterior means, standardised with statistics over every worker's objects
        with torch.no_grad():
            self.mu = self.vae.encode(torch.stack([r.params for r in train]).to(self.device)).float()  # [n, L]
        n = all_sum(torch.tensor([float(len(train))], dtype=torch.float64), self.comm_device)
        s = all_sum(self.mu.double().sum(0).cpu(), self.comm_device)
        s2 = all_sum((self.mu.double() ** 2).sum(0).cpu(), self.comm_device)
        self.n_total = int(n.item())
        mean = s / self.n_total
        self.latent_mean = mean.float().to(self.device)
        self.latent_std = (s2 / self.n_total - mean**2).clamp(min=0).sqrt().clamp(min=STD_FLOOR).float().to(self.device)
        self.target = (self.mu - self.latent_mean) / self.latent_std  # [n, L]

        # training prompts: every caption; every stored view but the last (kept unseen for evaluation)
        texts, text_obj = [], []
        for i, r in enumerate(train):
            for c in r.captions:
                texts.append(c)
                text_obj.append(i)
        if not texts:
            raise TrainError(f"the training objects of worker {self.rank} have no captions; the aligner needs them")
        self.text_emb = self.text_encoder.encode_text(texts).to(self.device)
        self.text_obj = torch.tensor(text_obj)
        self.text_sigma = ac.text_noise * embedding_spread(self.text_emb, self.comm_device)
        dims = {"text": self.text_encoder.dim}
        self.image_emb = self.image_obj = None
        if self.image_encoder is not None:
            imgs, img_obj = [], []
            for i, r in enumerate(train):
                if r.views is not None and len(r.views) >= 2:
                    imgs.append(composite(r.views.images[:-1], cfg.render.background))
                    img_obj += [i] * (len(r.views) - 1)
            if not imgs:
                raise TrainError("align.image_encoder is set but no training object has 2 or more stored views "
                                 "(one is kept unseen for evaluation); set align.image_encoder to null")
            self.image_emb = self.image_encoder.encode_image(torch.cat(imgs)).to(self.device)
            self.image_obj = torch.tensor(img_obj)
            dims["image"] = self.image_encoder.dim

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
        self.aligner = Aligner(ac, dims, self.vae.latent_dim)
        self.engine = make_engine(self.aligner, cfg.train, ac.lr, ac.weight_decay, ac.batch_size, self.device)
        self.nerf = NeRFField(self.vae.field)
        self.bank = RayBank(self.nerf, cfg.render) if ac.render_weight > 0 else None

    def train_step(self, step: int) -> dict[str, float]:
        ac = self.cfg.align
        gen = step_generator(self.cfg.train.seed, self.rank, step)
        n_img = 0
        if self.image_emb is not None:
            n_img = min(max(1, round(ac.batch_size * ac.image_fraction)), ac.batch_size - 1)
        ti = sample_indices(len(self.text_obj), ac.batch_size - n_img, gen)
        inputs = {"text": jitter(self.text_emb[ti], self.text_sigma, gen).to(self.engine.dtype)}
        objs = [self.text_obj[ti]]
        if n_img:
            ii = sample_indices(len(self.image_obj), n_img, gen)
            inputs["image"] = self.image_emb[ii].to(self.engine.dtype)
            objs.append(self.image_obj[ii])
        out = self.engine(inputs)
        pred = torch.cat([out[m].float() for m in inputs])  # [B, L] standardised
        obj = torch.cat(objs)
        latent_loss = (pred - self.target[obj]).pow(2).mean()
        loss = latent_loss
        values = {"latent": float(latent_loss.detach())}
        if self.bank is not None:
            params = self.vae.decode(pred * self.latent_std + self.latent_mean)
            r = render_loss(self.bank, params, [self.train_records[i] for i in obj.tolist()], ac.render_rays, gen)
            loss = loss + ac.render_weight * r
            values["render"] = float(r.detach())
        lr = lr_at(step, ac.lr, ac.warmup_steps, self.steps)
        self.engine.step(loss, lr)
        values.update(loss=float(loss.detach()), lr=lr)
        return values

    # ---- evaluation ----------------------------------------------------------------------------------------
    def export_aligner(self) -> Aligner:
        a = Aligner(self.cfg.align, self.aligner.input_dims, self.aligner.latent_dim)
        a.load_state_dict({k: v.detach().float().cpu() for k, v in self.aligner.state_dict().items()})
        return a.eval()

    def _all_mu(self) -> Tensor:
        """Every training object's latent, in global (sorted object id) order: row ``rank + i * world``."""
        g = torch.zeros(self.n_total, self.vae.latent_dim, dtype=torch.float64)
        for i in range(len(self.train_records)):
            g[self.rank + i * self.world] = self.mu[i].double().cpu()
        return all_sum(g, self.comm_device).float()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        aligner = self.export_aligner()
        vae = self.vae.cpu()
        mean, std = self.latent_mean.cpu(), self.latent_std.cpu()
        rc = self.cfg.render
        all_mu = self._all_mu()
        avg = Averager()
        mean_params = vae.decode(mean).clone()
        mean_grid = OccupancyGrid.from_params(self.nerf, mean_params, rc)
        per_worker = math.ceil(self.cfg.train.eval_objects / self.world)

        def latents(emb: Tensor, modality: str) -> Tensor:
            return aligner({modality: emb.cpu()})[modality] * std + mean

        def psnr_of(z: Tensor, views) -> float:
            return render_psnr(self.nerf, vae.decode(z), views, rc)

        for split, records in (("", self.train_records), ("val_", self.val_records)):
            subset = [(i, r) for i, r in enumerate(records) if r.views is not None][:per_worker]
            for i, r in subset:
                views = view_subset(r.views, self.cfg.train.eval_views)
                gt = composite(views.images, rc.background)
                rgb, _ = render_image(self.nerf, mean_params, views.cameras, rc, grid=mean_grid)
                avg.add(f"{split}psnr_mean_latent", float(psnr(rgb, gt).mean()))
                avg.add(f"{split}psnr_vae", psnr_of(vae.encode(r.params.clone()), views))
                prompts = {"caption": r.captions[:1], "paraphrase": r.heldout_captions[:2]}
                for kind, texts in prompts.items():
                    if not texts:
                        continue
                    z = latents(self.text_encoder.encode_text(texts), "text")
                    for zk in z:
                        avg.add(f"{split}psnr_{kind}", psnr_of(zk, views))
                    if not split:  # retrieval among the training objects (only those have an index)
                        hit = (torch.cdist(z, all_mu).argmin(1) == self.rank + i * self.world).float().mean()
                        avg.add(f"top1_{kind}", float(hit))
                if self.image_encoder is not None and len(r.views) >= 2:
                    img = composite(r.views.images[-1:], rc.background)
                    z = latents(self.image_encoder.encode_image(img), "image")
                    avg.add(f"{split}psnr_image", psnr_of(z[0], views))
                    if not split:
                        avg.add("top1_image", float(torch.cdist(z, all_mu).argmin(1)[0] == self.rank + i * self.world))
        self.vae.to(self.device)
        names = [f"{s}psnr_{k}" for s in ("", "val_") for k in ("caption", "paraphrase", "image", "mean_latent", "vae")]
        names += ["top1_caption", "top1_paraphrase", "top1_image"]
        return avg.mean(names, self.comm_device)

    # ---- files ---------------------------------------------------------------------------------------------
    def save_model(self, directory: Path) -> None:
        save_aligner(str(directory / MODEL_FILE), self.export_aligner(), self.latent_mean, self.latent_std,
                     self.vae, self._info())

    def _info(self) -> dict[str, Any]:
        return {**self.info, "num_train_objects": self.n_total, "steps": self.step}

    def load_model(self, directory: Path) -> None:
        tensors, meta = load_file(str(directory / MODEL_FILE), ALIGN_KIND)
        a, mean, std, _ = aligner_from_tensors(tensors, meta, str(directory / MODEL_FILE))
        with torch.no_grad():
            self.aligner.load_state_dict(a.state_dict())
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        self.target = (self.mu - self.latent_mean) / self.latent_std

    def export(self, out_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        final = next((r for r in reversed(self.history) if r.get("kind") == "eval"), {})
        info = {**self._info(), "final_eval": {k: v for k, v in final.items() if k != "kind"},
                "train": asdict(self.cfg.train)}
        path = save_aligner(out_uri, self.export_aligner(), self.latent_mean, self.latent_std, self.vae, info,
                            storage_options)
        vae_path = resolve(out_uri, VAE_FILENAME) if not out_uri.endswith(".safetensors") else None
        if vae_path is not None:
            fs_out, dst = storage.url_to_fs(vae_path, storage_options)
            if self.vae_uri is not None:  # a byte-for-byte copy of the trained VAE file
                fs_in, src = storage.url_to_fs(resolve(self.vae_uri, VAE_FILENAME), storage_options)
                storage.write_bytes_atomic(fs_out, dst, fs_in.cat_file(src))
            else:
                self.vae.cpu().save(vae_path, storage_options)
                self.vae.to(self.device)
        write_run_files(out_uri, self.history, "p2n train align", storage_options, self.cfg.to_dict())
        return {"model": path, "vae": vae_path}
