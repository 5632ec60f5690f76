"""Generate NeRFs for a whole prompts file on Ray Data: a pool of generator actors, each holding the checkpoint
once, turns batches of prompts into parquet shards (parameters + a PNG of views per prompt) at a folder or any
fsspec URI; resumable.

    ray job submit --working-dir . -- python ray_jobs/generate_batch.py --ckpt s3://bucket/run/align \
        --prompts s3://bucket/prompts.txt --out s3://bucket/generations --workers 8 --gpus-per-worker 0.5
    p2n generate-batch --ckpt outputs/demo/train/align --prompts prompts.txt --out /tmp/gens   # embedded local Ray

Pipeline: prompts without a row yet -> ``map_batches(GenerateActor)`` (``batch.batch_size`` prompts: one forward
pass and one shard each) on an ``ActorPoolStrategy(size=workers)`` -> the driver streams the small per-prompt
summaries back for progress and writes ``manifest.json``. Every per-batch step is ``p2n.generate_batch``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable (see _common.ensure_repo_on_path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_jobs._common import cpus_per_worker, die_once, ensure_repo_on_path, init_ray, job_main  # noqa: E402

ensure_repo_on_path()

from p2n.config import P2NConfig  # noqa: E402
from p2n.data import storage  # noqa: E402
from p2n.generate_batch import (  # noqa: E402
    MANIFEST,
    STATUS_OK,
    BatchError,
    prepare_output,
    read_prompts,
    write_manifest,
)


class GenerateActor:
    """One generator worker: loads the checkpoint in ``__init__``; each call is one batch -> one shard."""

    def __init__(self, ckpt: str, cfg: dict[str, Any], out_uri: str, storage_options: dict[str, Any],
                 torch_threads: int, device: str, kill_once: str | None = None):
        import torch

        from p2n.generate_batch import BatchGenerator

        torch.set_num_threads(torch_threads)
        self.worker = BatchGenerator(ckpt, P2NConfig.from_dict(cfg), out_uri, storage_options, device)
        self.kill_once = kill_once

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        die_once(self.kill_once, [str(i) for i in batch["index"]])  # tests: P2N_BATCH_KILL_ONCE=<index>@<marker>
        rows = self.worker([int(i) for i in batch["index"]], [str(p) for p in batch["prompt"]])
        pid = os.getpid()
        return {**{k: [r[k] for r in rows] for k in rows[0]}, "pid": [pid] * len(rows)}


def generate_batch(ckpt: str, prompts: str, out_uri: str, cfg: P2NConfig | None = None, *,
                   workers: int | None = None, gpus_per_worker: float | None = None, batch_size: int | None = None,
                   views: int | None = None, resume: bool = False, storage_options: dict[str, Any] | str | None = None,
                   address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate every prompt of the file ``prompts`` with the checkpoint ``ckpt`` into ``out_uri``.

    ``workers``/``gpus_per_worker``/``batch_size``/``views`` default to ``cfg.batch``. ``resume`` continues an
    output already at ``out_uri`` (prompts without a row only); without it a non-empty ``out_uri`` is an error.
    Returns a summary dict (the CLI's JSON line).
    """
    cfg = cfg or P2NConfig()
    overrides = [f"batch.{k}={v}" for k, v in (("workers", workers), ("gpus_per_worker", gpus_per_worker),
                                                ("batch_size", batch_size), ("views", views)) if v is not None]
    cfg = cfg.override(overrides)
    b = cfg.batch
    for name, value, least in (("--workers", b.workers, 1), ("--batch-size", b.batch_size, 1),
                               ("--views", b.views, 0), ("--gpus-per-worker", b.gpus_per_worker, 0)):
        if value < least:
            raise BatchError(f"{name} {value}: must be at least {least}")
    opts = storage.parse_storage_options(storage_options)
    out_uri, prompts_uri, ckpt = storage.absolute(out_uri), storage.absolute(prompts), storage.absolute(ckpt)

    # Everything that can be wrong with the input is checked before Ray starts: the prompts file, the output,
    # and the checkpoint (loaded once here, so a wrong path fails now and not in every actor).
    lines = read_prompts(prompts_uri, opts)
    done = prepare_output(out_uri, resume, opts)
    from p2n.generate import Generator

    Generator.load(ckpt, cfg, "cpu", opts)
    pending = [{"index": i, "prompt": p} for i, p in enumerate(lines) if i not in done]
    created = write_manifest(out_uri, opts, ckpt=ckpt, prompts_uri=prompts_uri, total=len(lines), complete=False,
                             cfg=cfg)["created"]
    _progress(f"generate_batch: {len(lines)} prompts, {len(lines) - len(pending)} already written, "
              f"{len(pending)} to generate on {b.workers} worker(s) -> {out_uri}", progress)

    rows: list[dict[str, Any]] = []
    started_ray, t0 = False, time.perf_counter()
    try:
        if pending:
            started_ray = init_ray(address)
            for row in _pipeline(pending, ckpt, cfg, out_uri, opts, progress).iter_rows():
                rows.append(row)
                if row["status"] != STATUS_OK:
                    _progress(f"[{row['index']}] failed: {row['error'][:200]}", progress)
        written = {r["index"] for r in rows} | set(done)
        manifest = write_manifest(out_uri, opts, ckpt=ckpt, prompts_uri=prompts_uri, total=len(lines),
                                  complete=len(written) >= len(lines), cfg=cfg, created=created)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    seconds = time.perf_counter() - t0
    ok = [r for r in rows if r["status"] == STATUS_OK]
    return {
        "out": out_uri, "manifest": storage.join(out_uri, MANIFEST), "prompts": len(lines),
        "skipped": len(lines) - len(pending), "generated": len(ok), "failed": len(rows) - len(ok),
        "complete": manifest["complete"], "rows": manifest["rows"], "workers": b.workers,
        "batch_size": b.batch_size, "seconds": round(seconds, 2),
        "prompts_per_second": round(len(rows) / seconds, 2) if rows and seconds > 0 else None,
        "mean_generate_ms": round(sum(r["generate_ms"] for r in ok) / len(ok), 3) if ok else None,
        "worker_pids": sorted({int(r["pid"]) for r in rows}),
        "failures": [{"index": r["index"], "prompt": r["prompt"][:200], "error": r["error"]}
                     for r in rows if r["status"] != STATUS_OK][:20],
    }


def _pipeline(pending: list[dict[str, Any]], ckpt: str, cfg: P2NConfig, out_uri: str, opts: dict[str, Any],
              progress: bool):
    import ray
    import ray.data

    b = cfg.batch
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = 0  # a batch that still fails after its retries fails the run (written rows stay)
    workers = min(b.workers, math.ceil(len(pending) / b.batch_size))
    cpus = cpus_per_worker(b.cpus_per_worker, workers)
    threads = b.torch_threads or max(1, math.floor(cpus))
    device = "cuda" if b.gpus_per_worker else "cpu"
    ds = ray.data.from_items(pending, override_num_blocks=max(1, math.ceil(len(pending) / b.batch_size)))
    with warnings.catch_warnings():
        # As in build_dataset.py: max_restarts/max_task_retries only exist as ray_remote_args (Ray 2.60).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            GenerateActor,
            fn_constructor_kwargs={"ckpt": ckpt, "cfg": cfg.to_dict(), "out_uri": out_uri, "storage_options": opts,
                                   "torch_threads": threads, "device": device,
                                   "kill_once": os.environ.get("P2N_BATCH_KILL_ONCE")},
            batch_size=b.batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus,
            num_gpus=b.gpus_per_worker or None,
            max_restarts=b.max_retries,
            max_task_retries=b.max_retries,
        )


def _progress(msg: str, enabled: bool) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from p2n.cli.generate_batch import add_arguments, job_kwargs

    return job_main("generate_batch.py", __doc__, add_arguments, job_kwargs, generate_batch, argv)


if __name__ == "__main__":
    sys.exit(main())
