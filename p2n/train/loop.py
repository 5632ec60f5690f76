"""The training loop both stages share: steps, metric records, evaluations, checkpoints, resume.

A :class:`Stage` (``vae_stage.VAEStage``, ``align_stage.AlignStage``) owns its model, engine and data and
implements ``train_step``, ``evaluate``, ``save_model``/``load_model`` and ``export``; :func:`run` drives it. The
Ray adapter passes ``report(metrics, save)``: at every checkpoint every worker calls it, and it is expected to
call ``save(directory)`` on a fresh local directory and hand that directory to Ray Train. Without Ray,
``report`` may be None (no checkpoints) or anything with that signature.

A checkpoint directory holds ``model.safetensors`` (the stage's model file, loadable on its own),
``config.json`` (the full run config), ``trainer_state.json`` (step, metric history) and the optimizer state
(``deepspeed/`` in DeepSpeed's own format, or ``optimizer.pt``).

Does not own: the models, losses, or Ray.
"""

from __future__ import annotations

import abc
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from p2n.config import P2NConfig
from p2n.train.data import TrainError, barrier, world
from p2n.train.engine import Engine
from p2n.train.metrics import reduce_means

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"

Report = Callable[[dict[str, Any], Callable[[str], None]], None]


class Stage(abc.ABC):
    name: str  # "vae" / "align"
    cfg: P2NConfig
    engine: Engine
    steps: int
    device: torch.device

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.rank, self.world = world()
        self.started = time.time()

    @property
    def comm_device(self) -> torch.device:
        """Where collectives run: the GPU under NCCL, the CPU under gloo."""
        return self.device

    # ---- what a stage implements --------------------------------------------------------------------------
    @abc.abstractmethod
    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step (1-based); this worker's loss values."""

    @abc.abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Global evaluation metrics (every worker calls it; results are reduced)."""

    @abc.abstractmethod
    def save_model(self, directory: Path) -> None:
        """Rank 0: write the model file (``MODEL_FILE``) into ``directory``."""

    @abc.abstractmethod
    def load_model(self, directory: Path) -> None:
        """Every rank: restore what the engine's own state does not hold (e.g. normalisation stats)."""

    @abc.abstractmethod
    def export(self, out_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0: write the final model and run files to ``out_uri``; returns what was written."""

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Every worker: the engine state; rank 0 also the model file and the trainer state."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.engine.save(d)
        if self.rank == 0:
            self.save_model(d)
            (d / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=1))
            (d / STATE_FILE).write_text(json.dumps({"stage": self.name, "step": self.step, "world": self.world,
                                                    "history": self.history}))
        barrier()

    def load(self, directory: str) -> int:
        """Restore from a checkpoint directory; returns the step it was taken at."""
        d = Path(directory)
        state = json.loads((d / STATE_FILE).read_text())
        if state.get("stage") != self.name:
            raise TrainError(f"checkpoint {directory} belongs to stage {state.get('stage')!r}, not {self.name!r}")
        self.engine.load(d)
        self.load_model(d)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.history.append({"kind": "resume", "step": self.step, "world": self.world})
        return self.step


def run(stage: Stage, report: Report | None = None, fault: Callable[[int], None] | None = None,
        log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``stage`` from ``stage.step`` to ``stage.steps``; returns the final metrics (every worker)."""
    tc = stage.cfg.train
    start = stage.step
    t0 = time.time()
    sums: dict[str, float] = {}
    n_acc = 0
    last_train: dict[str, Any] = {}
    last_eval: dict[str, float] = next((dict(r) for r in reversed(stage.history) if r.get("kind") == "eval"), {})
    engine_info = stage.engine.describe()
    for step in range(start + 1, stage.steps + 1):
        stage.step = step
        values = stage.train_step(step)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_acc += 1
        last = step == stage.steps
        if step % max(tc.log_every, 1) == 0 or last:
            rec = reduce_means({k: v / n_acc for k, v in sums.items()}, stage.comm_device)
            last_train = {"kind": "train", "step": step, **rec, "seconds": round(time.time() - t0, 3)}
            stage.history.append(last_train)
            sums, n_acc = {}, 0
            if log and stage.rank == 0:
                log(last_train)
        if last or (tc.eval_every and step % tc.eval_every == 0):
            last_eval = {"kind": "eval", "step": step, **stage.evaluate()}
            stage.history.append(last_eval)
            if log and stage.rank == 0:
                log(last_eval)
        if report is not None and (last or step % max(tc.checkpoint_every, 1) == 0):
            metrics = {"stage": stage.name, "step": step, **engine_info,
                       **{f"train/{k}": v for k, v in last_train.items() if k not in ("kind", "step")},
                       **{f"eval/{k}": v for k, v in last_eval.items() if k not in ("kind", "step")},
                       "resumed_from": start, "done": last}
            report(metrics, stage.save)
        if fault is not None:
            fault(step)
    if start >= stage.steps and not last_eval:
        last_eval = {"kind": "eval", "step": stage.steps, **stage.evaluate()}
    return {"stage": stage.name, "step": stage.step, **engine_info, "resumed_from": start,
            **{f"eval/{k}": v for k, v in last_eval.items() if k not in ("kind", "step")}}
