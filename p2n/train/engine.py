"""The optimisation backend behind both stages: DeepSpeed (the default) or plain DDP, chosen by
``train.backend`` and never swapped silently.

``make_engine(module, train_cfg, lr, weight_decay, batch_size, device)`` returns an :class:`Engine` with one
interface for both: ``engine(*inputs)`` runs the wrapped model, ``engine.step(loss, lr)`` does backward + update
at that learning rate, ``save(dir)`` / ``load(dir)`` write and read the optimizer state (DeepSpeed: its own
checkpoint format under ``dir/deepspeed``; DDP: ``dir/optimizer.pt`` read back with ``weights_only=True``).

* DeepSpeed: ``deepspeed.initialize`` with AdamW (``torch_adam``: no fused-op build on CPU), the ZeRO stage from
  ``train.zero_stage``, bf16 when ``train.precision`` resolves to it (``auto``: bf16 on GPU, fp32 on CPU),
  gradient clipping 1.0. It needs an initialised process group (Ray Train's, or the env:// variables); on CPU set
  ``DS_ACCELERATOR=cpu`` and it communicates over gloo.
* DDP: ``torch.optim.AdamW`` + ``DistributedDataParallel`` when a process group exists (a bare module in a single
  process), bf16 via autocast.

Does not own: the models, losses or the loop.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from p2n.config import TrainConfig
from p2n.train.data import TrainError

GRAD_CLIP = 1.0
DS_TAG = "state"
# torch builds DeepSpeed's ops (the CPU shared-memory comm op; fused optimisers on GPUs) under a ``lock`` file it
# creates and deletes, and every later loader waits for that file to go, with no time limit. A worker killed while
# holding it would hang every training start after it. No real build takes this long (the CPU op: ~30 s on 2 cores).
STALE_BUILD_LOCK_S = 300.0

log = logging.getLogger(__name__)


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S, root: str | None = None,
                            poll_s: float = 0.1) -> list[str]:
    """Wait for torch extension build locks to go, and delete those older than ``max_age_s`` (their builder is
    dead). ``root``: the extensions folder (default ``$TORCH_EXTENSIONS_DIR`` or torch's cache). Returns the
    deleted paths. Polls as often as torch's own wait does (0.1 s): two ranks starting together each see the
    other's short-lived lock, and a coarser poll would add its whole period to every training start."""
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    locks = [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]  # <root>/<op>/lock, <root>/py311_cpu/<op>/lock
    removed = []
    for lock in locks:
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except OSError:
                break  # gone: its build finished
            if age <= max_age_s:
                time.sleep(min(poll_s, max_age_s - age + 0.01))
                continue
            try:
                lock.unlink()
                removed.append(str(lock))
                log.warning("removed %s, a torch extension build lock %.0f s old: the process that took it is gone",
                            lock, age)
            except OSError:
                pass  # another worker removed it first
            break
    return removed


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.precision not in ("fp32", "bf16"):
        raise TrainError(f"train.precision={cfg.precision!r}: use auto, fp32 or bf16")
    return cfg.precision


def deepspeed_config(cfg: TrainConfig, lr: float, weight_decay: float, batch_size: int, precision: str) -> dict:
    if cfg.zero_stage not in (0, 1, 2):
        raise TrainError(f"train.zero_stage={cfg.zero_stage}: p2n supports ZeRO stages 0, 1 and 2 (its models fit "
                         "on one device; stage 3 would need gathered weights for export)")
    return {
        "train_micro_batch_size_per_gpu": int(batch_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": GRAD_CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Engine:
    """One training backend around one module; see the module docstring."""

    kind: str
    module: nn.Module  # the bare module (weights to save)
    device: torch.device
    precision: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def step(self, loss: Tensor, lr: float) -> None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def load(self, directory: str | Path) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What actually runs, for metrics and tests: engine class, ZeRO stage, precision, comm backend."""
        return {"backend": self.kind, "precision": self.precision,
                "comm_backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"}


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, module: nn.Module, cfg: TrainConfig, lr: float, weight_decay: float, batch_size: int,
                 device: torch.device):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as e:
            raise TrainError(f"train.backend=deepspeed but DeepSpeed cannot be imported ({e}); install it "
                             "(pip install -e '.[train]') or set train.backend=ddp (the plain-DDP fallback)") from None
        if not (dist.is_available() and dist.is_initialized()):
            for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
                os.environ.setdefault(k, v)
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        self.device, self.precision = device, resolve_precision(cfg, device)
        self.config = deepspeed_config(cfg, lr, weight_decay, batch_size, self.precision)
        params = [p for p in module.parameters() if p.requires_grad]
        clear_stale_build_locks()
        try:
            self.raw, self.optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                                                  config=self.config)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises many types; name the fallback
            raise TrainError(f"DeepSpeed failed to initialise on {device} ({type(e).__name__}: {e}); fix the "
                             "environment, or set train.backend=ddp to use the documented plain-DDP fallback") from e
        self.module = self.raw.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw(*args, **kwargs)

    def step(self, loss: Tensor, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.raw.backward(loss)
        self.raw.step()

    def save(self, directory: str | Path) -> None:
        self.raw.save_checkpoint(str(Path(directory) / "deepspeed"), tag=DS_TAG)

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / "deepspeed"
        if not (path / DS_TAG).is_dir():
            raise TrainError(f"checkpoint {directory} has no DeepSpeed state (written by another backend?); resume "
                             "with the backend that wrote it")
        load_path, _ = self.raw.load_checkpoint(str(path), tag=DS_TAG)
        if load_path is None:
            raise TrainError(f"DeepSpeed could not load the checkpoint in {path}")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "engine": type(self.raw).__name__,
                "zero_stage": int(self.raw.zero_optimization_stage()),
                "optimizer": type(self.optimizer).__name__}


class DDPEngine(Engine):
    kind = "ddp"

    def __init__(self, module: nn.Module, cfg: TrainConfig, lr: float, weight_decay: float, device: torch.device):
        self.device, self.precision = device, resolve_precision(cfg, device)
        self.module = module.to(device)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.raw = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.raw = self.module
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.raw(*args, **kwargs)
        return self.raw(*args, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # autocast handles bf16; inputs stay float32

    def step(self, loss: Tensor, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), GRAD_CLIP)
        self.optimizer.step()

    def save(self, directory: str | Path) -> None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            torch.save(self.optimizer.state_dict(), Path(directory) / "optimizer.pt")

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / "optimizer.pt"
        if not path.is_file():
            raise TrainError(f"checkpoint {directory} has no optimizer.pt (written by another backend?); resume "
                             "with the backend that wrote it")
        self.optimizer.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "engine": type(self.raw).__name__, "zero_stage": 0,
                "optimizer": type(self.optimizer).__name__}


def make_engine(module: nn.Module, cfg: TrainConfig, lr: float, weight_decay: float, batch_size: int,
                device: torch.device | str = "cpu") -> Engine:
    device = torch.device(device)
    if cfg.backend == "deepspeed":
        return DeepSpeedEngine(module.to(device), cfg, lr, weight_decay, batch_size, device)
    if cfg.backend == "ddp":
        return DDPEngine(module, cfg, lr, weight_decay, device)
    raise TrainError(f"train.backend={cfg.backend!r}: use deepspeed or ddp")


def lr_at(step: int, base: float, warmup: int, total: int, final_factor: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_factor * base`` at ``total`` (1-based)."""
    import math

    if warmup > 0 and step <= warmup:
        return base * step / warmup
    span = max(total - warmup, 1)
    prog = min(max(step - warmup, 0) / span, 1.0)
    return base * (final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * prog)))
