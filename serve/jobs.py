"""Refinement jobs that survive the replica running them: records on the artefact store, and the runner.

A job lives under ``jobs/<id>/`` on the store (``serve/store.py``), never only in a replica's memory:

- ``job.json``      the validated request and the full p2n config it runs with (written once, at submission);
- ``init.safetensors``, ``image``  the initialization the Generator made and the reference image, if any;
- ``state.json``    state (queued, running, succeeded, failed, cancelled), progress (step, loss, PSNR), the
                    replica that owns it and its heartbeat, attempts, where it last resumed from, the result;
- ``cancel``        present once a cancel was requested;
- ``ckpt/``         the refinement checkpoint (``p2n.refine.loop``: every ``serve.job_checkpoint_every`` steps);
- ``result/``       params.safetensors, curve.json, curve.png, turntable.gif, config.yaml.

``active/<id>`` marks jobs not yet finished, so a supervisor finds orphans without listing every job.

:func:`run_job` is what a Refiner replica calls: it claims the job (unless a live replica holds it), resumes
from the checkpoint if one exists, heartbeats from a thread while it runs, reports progress, honours
cancellation at the next step, and writes the final state. The state file has one writer at a time (the owner);
the ingress only creates jobs, marks queued ones cancelled and marks jobs failed that exhausted their attempts.

Nothing here imports Ray: the Serve adapter (``serve/app.py``) supplies the replica name and a liveness check.

Does not own: the refinement itself (``p2n.refine``) or the store's bytes (``serve/store.py``).
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from serve.store import ArtefactStore

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
RESULT_FILES = ("params.safetensors", "turntable.gif", "curve.png", "curve.json", "config.yaml")
PROGRESS_KEYS = ("loss", "lr", "psnr_batch", "psnr_train", "psnr_test")


class Cancelled(Exception):
    """Raised from the refinement's step callback when the job's cancel flag is set."""


class JobStore:
    """Job records on an :class:`ArtefactStore` (see the module docstring for the layout)."""

    def __init__(self, store: ArtefactStore):
        self.store = store

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    @staticmethod
    def valid_id(job_id: str) -> bool:
        return bool(JOB_ID.match(job_id or ""))

    def key(self, job_id: str, name: str = "") -> str:
        if not self.valid_id(job_id):
            raise KeyError(job_id)
        return f"jobs/{job_id}/{name}".rstrip("/")

    # ---- records ------------------------------------------------------------------------------------------
    def create(self, job_id: str, request: dict[str, Any], cfg: dict[str, Any], files: dict[str, bytes]) -> dict:
        now = time.time()
        for name, data in files.items():
            self.store.write(self.key(job_id, name), data)
        self.store.write_json(self.key(job_id, "job.json"), {"id": job_id, "request": request, "cfg": cfg,
                                                              "created": now})
        state = {"id": job_id, "state": "queued", "created": now, "updated": now, "attempts": 0, "owner": None,
                 "heartbeat": None, "step": 0, "total_steps": int(cfg["refine"]["steps"]), "resumes": []}
        self.store.write_json(self.key(job_id, "state.json"), state)
        self.store.write(f"active/{job_id}", b"")
        return state

    def job(self, job_id: str) -> dict | None:
        try:
            return self.store.read_json(self.key(job_id, "job.json"))
        except (FileNotFoundError, KeyError):
            return None

    def state(self, job_id: str) -> dict | None:
        try:
            return self.store.read_json(self.key(job_id, "state.json"))
        except (FileNotFoundError, KeyError):
            return None

    def write_state(self, job_id: str, state: dict) -> None:
        state["updated"] = time.time()
        self.store.write_json(self.key(job_id, "state.json"), state)
        if state["state"] in TERMINAL:
            self.store.delete(f"active/{job_id}")

    def update(self, job_id: str, **fields: Any) -> dict:
        """Read-modify-write of state.json (callers other than the owner: ingress bookkeeping)."""
        state = self.state(job_id) or {"id": job_id}
        state.update(fields)
        self.write_state(job_id, state)
        return state

    def request_cancel(self, job_id: str) -> None:
        self.store.write(self.key(job_id, "cancel"), b"1")

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.exists(self.key(job_id, "cancel"))

    def active_ids(self) -> list[str]:
        return [i for i in self.store.list("active") if self.valid_id(i)]

    def read_file(self, job_id: str, name: str) -> bytes:
        return self.store.read(self.key(job_id, name))


def lease_expired(state: dict, lease_s: float, now: float | None = None) -> bool:
    """True when nobody has heartbeaten this job for ``lease_s`` (a queued job counts from its last update)."""
    last = state.get("heartbeat") or state.get("updated") or state.get("created") or 0.0
    return (now or time.time()) - float(last) > lease_s


class _Owner:
    """The owner's view of state.json: an in-memory copy written whole, under a lock (progress + heartbeat)."""

    def __init__(self, jobs: JobStore, job_id: str, state: dict, heartbeat_s: float):
        self.jobs, self.job_id, self.state = jobs, job_id, state
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.last_write = 0.0
        self.thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name=f"hb-{job_id[:8]}")

    def set(self, throttle_s: float = 0.0, **fields: Any) -> None:
        with self.lock:
            self.state.update(fields)
            now = time.time()
            if throttle_s and now - self.last_write < throttle_s:
                return
            self.state["heartbeat"] = now
            self.jobs.write_state(self.job_id, self.state)
            self.last_write = now

    def _beat(self, every: float) -> None:
        while not self.stop.wait(every):
            try:
                self.set()
            except Exception:  # a flaky store must not end the job; the next beat tries again
                pass

    def __enter__(self) -> "_Owner":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def run_job(jobs: JobStore, job_id: str, worker: str, is_alive: Callable[[str], bool] = lambda _: False,
            lease_s: float = 20.0, max_attempts: int = 5, hook: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) job ``job_id`` as ``worker`` until it ends; returns its final state.

    Returns at once, without touching the job, when it has already ended or when another worker that
    ``is_alive`` holds it with a fresh heartbeat. ``hook(step)`` is called every step (tests use it to die
    mid-run: any BaseException that is not an Exception leaves the job running, as a killed process would).
    """
    from p2n.errors import P2NError

    state = jobs.state(job_id)
    job = jobs.job(job_id)
    if state is None or job is None:
        raise KeyError(f"no job {job_id}")
    if state["state"] in TERMINAL:
        return state
    owner = state.get("owner")
    if (owner and owner != worker and state["state"] == "running" and not lease_expired(state, lease_s)
            and is_alive(owner)):
        return state  # a live replica is running it; this dispatch is a duplicate
    if jobs.cancel_requested(job_id):
        state.update(state="cancelled", finished=time.time(), owner=None)
        jobs.write_state(job_id, state)
        return state
    if int(state.get("attempts", 0)) >= max_attempts:
        state.update(state="failed", finished=time.time(), owner=None,
                     error={"code": "too_many_attempts",
                            "message": f"gave up after {state['attempts']} attempts (the replicas running this job "
                                       "kept dying); resubmit it, or look at the Refiner replicas' logs"})
        jobs.write_state(job_id, state)
        return state

    state.update(state="running", owner=worker, attempts=int(state.get("attempts", 0)) + 1,
                 started=state.get("started") or time.time())
    with _Owner(jobs, job_id, state, heartbeat_s=max(lease_s / 4, 0.2)) as own:
        own.set()
        try:
            result = _refine(jobs, job_id, job, own, hook)
        except Cancelled:
            own.set(state="cancelled", finished=time.time(), owner=None)
        except P2NError as e:
            own.set(state="failed", finished=time.time(), owner=None,
                    error={"code": _code(e), "message": str(e)})
        except Exception as e:  # a bug or a resource problem: the job fails, the replica lives on
            own.set(state="failed", finished=time.time(), owner=None,
                    error={"code": "internal", "message": f"{type(e).__name__}: {e}"})
        else:
            own.set(state="succeeded", finished=time.time(), owner=None, result=result,
                    step=result["steps"])
        return dict(own.state)


def _code(e: Exception) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower()


def build_target(jobs: JobStore, job_id: str, request: dict, cfg):
    """The refinement target of a request: a procedural scene (posed views), a reference image or a prompt."""
    from p2n.generate import decode_image
    from p2n.refine import from_image, from_prompt, from_scene

    if request.get("scene"):
        target = from_scene(request["scene"], cfg)
        if request.get("prompt"):
            target.prompt = request["prompt"]
        return target
    if request.get("image"):
        img = decode_image(jobs.read_file(job_id, "image"), "image")
        target = from_image(img, cfg)
        target.prompt = request.get("prompt")
        return target
    return from_prompt(request["prompt"])


def _refine(jobs: JobStore, job_id: str, job: dict, own: _Owner, hook: Callable[[int], None] | None) -> dict:
    import math

    from p2n.config import P2NConfig
    from p2n.nerf.params import params_from_bytes
    from p2n.refine import initial_params, refine, write_outputs
    from p2n.refine.loop import CKPT_DIR, resolve_guidance

    request, cfg = job["request"], P2NConfig.from_dict(job["cfg"])
    store = jobs.store
    target = build_target(jobs, job_id, request, cfg)
    if store.exists(jobs.key(job_id, "init.safetensors")):
        init, _, _ = params_from_bytes(jobs.read_file(job_id, "init.safetensors"), cfg.field, "init.safetensors")
    else:
        init = initial_params("scratch", cfg)
    guidance = resolve_guidance(request["guidance"], cfg)
    steps = int(cfg.refine.steps)

    with tempfile.TemporaryDirectory(prefix=f"p2n-job-{job_id[:8]}-") as tmp:
        ckpt_key = jobs.key(job_id, CKPT_DIR)
        ckpt_dir = store.local_path(ckpt_key)
        if ckpt_dir is None:  # object store: work on a local copy, upload after every checkpoint
            ckpt_dir = Path(tmp) / CKPT_DIR
            store.download_dir(ckpt_key, ckpt_dir)
        last_check, first = 0.0, True
        every = cfg.refine.checkpoint_every

        def on_step(step: int, rec: dict) -> None:
            nonlocal last_check, first
            if first and step > 1:  # the loop resumed from the checkpoint of step - 1
                own.set(resumed_from_step=step - 1,
                        resumes=[*own.state.get("resumes", []), {"from_step": step - 1,
                                                                  "attempt": own.state["attempts"]}])
            first = False
            now = time.monotonic()
            if store.is_local or now - last_check > 1.0:
                last_check = now
                if jobs.cancel_requested(job_id):
                    raise Cancelled()
            if not store.is_local and every and step > 1 and (step - 1) % every == 0:
                store.upload_dir(ckpt_dir, ckpt_key)  # the loop saved step-1's checkpoint after the last call
            fields = {k: rec[k] for k in PROGRESS_KEYS if k in rec and not math.isnan(rec[k])}
            own.set(throttle_s=0.2, step=step, seconds=rec.get("seconds"), **fields)
            if hook is not None:
                hook(step)

        res = refine(init, guidance, target, cfg, steps, ckpt_dir=ckpt_dir, resume=True, on_step=on_step)
        out = store.local_path(jobs.key(job_id, "result")) or Path(tmp) / "result"
        res.meta["init"] = request.get("init")
        write_outputs(res, cfg, out, meta={"job": job_id})
        if not store.is_local:
            store.upload_dir(ckpt_dir, ckpt_key)
            store.upload_dir(out, jobs.key(job_id, "result"))

    def num(x: float) -> float | None:
        return None if x is None or math.isnan(x) else float(x)

    return {"steps": res.steps, "start_step": res.start_step, "seconds": res.seconds,
            "psnr_start": num(res.psnr_start), "psnr_test": num(res.psnr_test),
            "files": [f for f in RESULT_FILES]}
