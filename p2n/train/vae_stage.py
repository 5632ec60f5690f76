"""Stage 1 training: the VAE over this worker's share of the fitted parameter vectors.

Per step: a seeded batch of objects, normalised with the *global* per-coordinate statistics (reduced across
workers once at start), encoded, sampled, decoded; loss = reconstruction MSE + ``vae.kl_weight`` x KL
(+ ``vae.render_weight`` x decoded-render MSE). Evaluation renders decoded parameters of training objects and of
the held-out split next to the fitted ones (``psnr_fitted``, ``psnr_decoded``, ``psnr_gap``).

Does not own: the model (``p2n.latent``), the loop (``loop.py``), Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from p2n.config import FieldConfig, P2NConfig
from p2n.latent.checkpoint import load_file
from p2n.latent.vae import KIND, VAEModel
from p2n.nerf.field import NeRFField
from p2n.train.data import ObjectRecord, TrainError, global_stats, sample_indices, step_generator
from p2n.train.engine import lr_at, make_engine
from p2n.train.losses import RayBank, render_loss, vae_loss
from p2n.train.loop import MODEL_FILE, Stage
from p2n.train.metrics import Averager, render_psnr, view_subset, write_run_files


class VAEStage(Stage):
    name = "vae"

    def __init__(self, cfg: P2NConfig, train: list[ObjectRecord], val: list[ObjectRecord], field: FieldConfig,
                 device: torch.device | str = "cpu", info: dict[str, Any] | None = None):
        super().__init__()
        # the dataset's field, not whatever the caller's config says: it is what the parameters mean
        self.cfg, self.field, self.device = dataclasses.replace(cfg, field=field), field, torch.device(device)
        self.train_records, self.val_records = train, val
        vc = cfg.vae
        self.steps = vc.steps
        if not train:
            raise TrainError(f"worker {self.rank} of {self.world} holds no training objects; use at most as many "
                             "workers as the dataset has training objects")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
        params = torch.stack([r.params for r in train])  # [n, P]
        mean, std, n_total = global_stats(params, vc.std_floor, self.comm_device)
        self.model = VAEModel(vc, field, mean, std, info={**(info or {}), "num_train_objects": n_total})
        self.x = self.model.normalize(params)  # [n, P], float32, CPU
        self.engine = make_engine(self.model.net, cfg.train, vc.lr, vc.weight_decay, vc.batch_size, self.device)
        self.nerf = NeRFField(field)
        self.bank = RayBank(self.nerf, cfg.render) if vc.render_weight > 0 else None

    def train_step(self, step: int) -> dict[str, float]:
        vc = self.cfg.vae
        gen = step_generator(self.cfg.train.seed, self.rank, step)
        idx = sample_indices(len(self.train_records), vc.batch_size, gen)
        x = self.x[idx].to(self.device)
        eps = torch.randn((len(idx), vc.latent_dim), generator=gen).to(self.device)
        out = self.engine(x.to(self.engine.dtype), eps.to(self.engine.dtype))
        loss, parts = vae_loss(out, x, vc.kl_weight)
        values = {k: float(v) for k, v in parts.items()}
        if self.bank is not None:
            decoded = self.model.denormalize(out["recon"].float())
            r = render_loss(self.bank, decoded, [self.train_records[i] for i in idx.tolist()], vc.render_rays, gen)
            loss = loss + vc.render_weight * r
            values["render"] = float(r.detach())
        lr = lr_at(step, vc.lr, vc.warmup_steps, self.steps)
        self.engine.step(loss, lr)
        values.update(loss=float(loss.detach()), lr=lr)
        return values

    # ---- evaluation ----------------------------------------------------------------------------------------
    def export_model(self) -> VAEModel:
        """A float32 copy of the current model (what ``export`` writes and what evaluation renders)."""
        m = VAEModel(self.cfg.vae, self.field, info=dict(self.model.info))
        m.load_state_dict({k: v.detach().float().cpu() for k, v in self.model.state_dict().items()})
        return m.eval()

    def _eval_subset(self, records: list[ObjectRecord]) -> list[ObjectRecord]:
        per_worker = math.ceil(self.cfg.train.eval_objects / self.world)
        return [r for r in records if r.views is not None][:per_worker]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.export_model()
        avg = Averager()
        rc = self.cfg.render
        for prefix, records in (("", self.train_records), ("val_", self.val_records)):
            subset = self._eval_subset(records)
            if not subset:
                continue
            params = torch.stack([r.params for r in subset])
            decoded = model.decode(model.encode(params))
            for i, r in enumerate(subset):
                views = view_subset(r.views, self.cfg.train.eval_views)
                fitted = render_psnr(self.nerf, r.params, views, rc)
                dec = render_psnr(self.nerf, decoded[i], views, rc)
                avg.add(f"{prefix}psnr_fitted", fitted)
                avg.add(f"{prefix}psnr_decoded", dec)
                avg.add(f"{prefix}psnr_gap", fitted - dec)
                avg.add(f"{prefix}param_mse", float(((model.normalize(decoded[i]) - model.normalize(r.params)) ** 2)
                                                     .mean()))
        names = [f"{p}{k}" for p in ("", "val_") for k in ("psnr_fitted", "psnr_decoded", "psnr_gap", "param_mse")]
        return avg.mean(names, self.comm_device)

    # ---- files ---------------------------------------------------------------------------------------------
    def save_model(self, directory: Path) -> None:
        self.export_model().save(str(directory / MODEL_FILE))

    def load_model(self, directory: Path) -> None:
        # Weights and normalisation statistics from the model file (DeepSpeed's own state holds the same weights;
        # DDP's optimizer.pt holds none).
        tensors, _ = load_file(str(directory / MODEL_FILE), KIND)
        with torch.no_grad():
            self.model.load_state_dict(tensors)
        self.x = self.model.normalize(torch.stack([r.params for r in self.train_records]))

    def export(self, out_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        model = self.export_model()
        final = next((r for r in reversed(self.history) if r.get("kind") == "eval"), {})
        model.info.update(steps=self.step, final_eval={k: v for k, v in final.items() if k != "kind"},
                          train=asdict(self.cfg.train))
        path = model.save(out_uri, storage_options)
        write_run_files(out_uri, self.history, "p2n train vae", storage_options, self.cfg.to_dict())
        return {"model": path}
