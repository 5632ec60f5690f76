"""Build the per-object NeRF dataset on Ray Data: one row per object, fitted in parallel by a pool of actors and
written as parquet shards (plus manifest.json) to a local folder or any fsspec URI; resumable.

    ray job submit --working-dir . -- python ray_jobs/build_dataset.py --out s3://bucket/ds --num-objects 5000 \
        --workers 16 --gpus-per-worker 1
    p2n dataset build --out /tmp/ds --num-objects 16 --workers 2          # same, on an embedded local Ray

Pipeline: object sources (procedural ids, or catalogue folders) -> ``map_batches(FitActor)`` on an
``ActorPoolStrategy(size=workers)`` -> each actor fits a batch with ``p2n.data.build.ObjectFitter`` and writes it
as one shard (atomically) -> the driver streams the small per-object summaries back for progress and writes the
manifest. This module only schedules; every per-object step is a plain function in ``p2n/data``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable (see _common.ensure_repo_on_path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_jobs._common import cpus_per_worker, die_once, ensure_repo_on_path, init_ray, job_main  # noqa: E402
from ray_jobs.cpu_slots import claim_cpus, pin_threads  # noqa: E402

ensure_repo_on_path()

from p2n.config import P2NConfig  # noqa: E402
from p2n.data import storage  # noqa: E402
from p2n.data.build import ObjectSource, catalogue_sources, procedural_sources  # noqa: E402
from p2n.data.errors import DataError  # noqa: E402
from p2n.data.output import prepare_output, write_manifest  # noqa: E402
from p2n.data.schema import MANIFEST, STATUS_OK  # noqa: E402


class BuildInterrupted(RuntimeError):
    """The driver stopped consuming results early (``stop_after``): what was written stays, ``--resume`` goes on."""


class FitActor:
    """One fitting worker: holds the config, the shared initial parameters and the layout (``ObjectFitter``);
    each call fits a batch of objects and writes them as one shard."""

    def __init__(self, cfg: dict[str, Any], out_uri: str, storage_options: dict[str, Any], torch_threads: int,
                 kill_once: str | None = None):
        import torch

        from p2n.data.build import ObjectFitter

        torch.set_num_threads(torch_threads)
        config = P2NConfig.from_dict(cfg).override([f"fit.num_threads={torch_threads}"])
        self.pin = torch_threads if config.dataset.pin_cpus and not config.dataset.gpus_per_worker else 0
        self.cpus = claim_cpus(self.pin) if self.pin else None
        self.fitter = ObjectFitter(config, storage_options)
        self.out_uri = out_uri
        self.storage_options = storage_options
        self.kill_once = kill_once

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from p2n.data.output import write_shard

        if self.pin and self.cpus is None:  # cores still held by the actors of a build that just ended
            self.cpus = claim_cpus(self.pin)
        pin_threads(self.cpus)  # every call: Ray may run it on a thread started after __init__
        started, cpu0 = time.time(), time.process_time()
        n = len(batch["object_id"])
        sources = [ObjectSource(str(batch["object_id"][i]), str(batch["kind"][i]), str(batch["uri"][i]))
                   for i in range(n)]
        die_once(self.kill_once, [s.object_id for s in sources])
        rows = [self.fitter.fit(s) for s in sources]
        shard = write_shard(rows, self.out_uri, self.storage_options)
        finished, cpu = time.time(), time.process_time() - cpu0
        return {
            "object_id": [r["object_id"] for r in rows],
            "status": [r["status"] for r in rows],
            "error": [r["error"] for r in rows],
            "psnr_test": [r["psnr_test"] for r in rows],
            "seconds": [r["seconds"] for r in rows],
            "shard": [shard] * n,
            "pid": [os.getpid()] * n,
            "cpus": [",".join(map(str, sorted(self.cpus or ())))] * n,  # "" when not pinned
            "started": [started] * n,
            "finished": [finished] * n,
            "cpu_seconds": [cpu / n] * n,  # this process's CPU time: < wall-clock when cores are shared
        }


# Ray Data's scheduling loop blocks in ``ray.wait`` for at most this long (its default is 0.1 s) before it polls its
# operators, the cluster autoscaler and the stats actor again. A fit takes seconds and every actor already holds
# its next batch (``dataset.batches_in_flight``), so ten polls a second buy nothing; on a 2-core box they cost the
# fitting actors ~2% of a core (driver CPU 3.7 -> 1.8 s over a 100 s, 24-object build with 1 s).
POLL_FRACTION = 0.1  # of the quickest object seen so far
MAX_POLL_S = 1.0


@contextlib.contextmanager
def _scheduler_poll():
    """Yields ``adapt(object_seconds)``, which lengthens Ray Data's scheduling poll to ``POLL_FRACTION`` of the
    quickest object seen (between Ray's default and ``MAX_POLL_S``); restores the default on exit. A no-op when
    this Ray has no such setting."""
    try:
        from ray.data._internal.execution import streaming_executor_state as executor_state

        default = float(executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S)
    except (ImportError, AttributeError):
        yield lambda seconds: None
        return
    quickest = [math.inf]

    def adapt(object_seconds: float) -> None:
        quickest[0] = min(quickest[0], object_seconds)
        executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = min(MAX_POLL_S, max(default, POLL_FRACTION * quickest[0]))

    try:
        yield adapt
    finally:
        executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = default


def _progress(msg: str, enabled: bool) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def build(out_uri: str, cfg: P2NConfig | None = None, num_objects: int | None = None, workers: int | None = None,
          resume: bool = False, *, catalogue: str | None = None, gpus_per_worker: float | None = None,
          storage_options: dict[str, Any] | str | None = None, address: str | None = None, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Fit ``num_objects`` procedural objects (or every object of ``catalogue``) into a dataset at ``out_uri``.

    ``workers``/``gpus_per_worker``/``num_objects`` default to ``cfg.dataset``. ``resume`` continues a dataset
    already at ``out_uri`` (fitting only objects without a row); without it a non-empty ``out_uri`` is an error.
    Connects to ``address``/``RAY_ADDRESS`` or starts a local Ray, unless one is initialised already.
    ``stop_after`` (tests): stop after that many objects have been written and raise ``BuildInterrupted``.
    Returns a summary dict (also printed as the JSON line of the CLI).
    """
    cfg = cfg or P2NConfig()
    out_uri, catalogue = storage.absolute(out_uri), storage.absolute(catalogue)
    if catalogue is not None and num_objects is not None:
        raise DataError("pass one of --num-objects and --catalogue, not both")
    overrides = []
    for key, value in (("num_objects", num_objects), ("workers", workers), ("gpus_per_worker", gpus_per_worker)):
        if value is not None:
            overrides.append(f"dataset.{key}={value}")
    cfg = cfg.override(overrides)
    ds_cfg = cfg.dataset
    if ds_cfg.workers < 1:
        raise DataError(f"--workers {ds_cfg.workers}: need at least 1 fitting worker")
    if ds_cfg.gpus_per_worker < 0:
        raise DataError(f"--gpus-per-worker {ds_cfg.gpus_per_worker} must be >= 0")
    if ds_cfg.objects_per_shard < 1:
        raise DataError(f"dataset.objects_per_shard={ds_cfg.objects_per_shard} must be >= 1")
    if ds_cfg.batches_in_flight < 1:
        raise DataError(f"dataset.batches_in_flight={ds_cfg.batches_in_flight} must be >= 1")
    opts = storage.parse_storage_options(storage_options)

    # Everything that can be wrong with the input is checked before Ray starts.
    if catalogue is not None:
        sources = catalogue_sources(catalogue, opts)
        source_info: dict[str, Any] = {"catalogue": catalogue}
    else:
        if ds_cfg.num_objects < 1:
            raise DataError(f"--num-objects {ds_cfg.num_objects}: need at least 1 object")
        sources = procedural_sources(cfg, ds_cfg.num_objects)
        source_info = {"num_objects": ds_cfg.num_objects, "include_pairs": ds_cfg.include_pairs}
    state = prepare_output(out_uri, cfg, resume, opts)
    pending = [s for s in sources if s.object_id not in state.done]
    skipped = len(sources) - len(pending)
    created = write_manifest(out_uri, cfg, False, opts, state.created, source_info)["created"]
    _progress(f"build_dataset: {len(sources)} objects, {skipped} already written, {len(pending)} to fit on "
              f"{ds_cfg.workers} worker(s) -> {out_uri}", progress)

    summaries: list[dict[str, Any]] = []
    timing = {"init_seconds": 0.0, "pipeline_seconds": 0.0, "fit_span_seconds": 0.0}
    started_ray = False
    interrupted = False
    try:
        if pending:
            t0 = time.perf_counter()
            started_ray = init_ray(address)
            timing["init_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            with _scheduler_poll() as adapt_poll:
                it = _pipeline(pending, cfg, out_uri, opts, progress).iter_rows()
                try:
                    for row in it:
                        summaries.append(row)
                        adapt_poll(float(row["seconds"]))
                        _progress(f"[{len(summaries) + skipped}/{len(sources)}] {row['object_id']}: {row['status']}"
                                  + (f" psnr {row['psnr_test']:.2f} dB" if row["status"] == STATUS_OK else
                                     f" ({row['error'][:200]})") + f" {row['seconds']:.1f} s", progress)
                        if stop_after is not None and len(summaries) >= stop_after:
                            interrupted = True
                            break
                finally:
                    close = getattr(it, "close", None)
                    if close:
                        close()
            timing["pipeline_seconds"] = time.perf_counter() - t1
            if summaries:
                timing["fit_span_seconds"] = (max(r["finished"] for r in summaries)
                                              - min(r["started"] for r in summaries))
        done = set(state.done) | {r["object_id"] for r in summaries}
        complete = not interrupted and all(s.object_id in done for s in sources)
        manifest = write_manifest(out_uri, cfg, complete, opts, created, source_info)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if interrupted:
        raise BuildInterrupted(f"stopped after {len(summaries)} objects (stop_after={stop_after}); "
                               f"rerun with --resume to finish")

    fitted = len(summaries)
    span = timing["fit_span_seconds"]
    return {
        "out": out_uri,
        "manifest": f"{out_uri.rstrip('/')}/{MANIFEST}",
        "objects": len(sources),
        "skipped": skipped,
        "fitted": fitted,
        "fitted_ok": sum(r["status"] == STATUS_OK for r in summaries),
        "fitted_failed": sum(r["status"] != STATUS_OK for r in summaries),
        "counts": manifest["counts"],
        "psnr_test": manifest["psnr_test"],
        "failures": manifest["failures"],
        "complete": manifest["complete"],
        "workers": ds_cfg.workers,
        "gpus_per_worker": ds_cfg.gpus_per_worker,
        "worker_pids": sorted({int(r["pid"]) for r in summaries}),
        "worker_cpus": sorted({r["cpus"] for r in summaries if r["cpus"]}),  # cores the actors were pinned to
        **{k: round(v, 3) for k, v in timing.items()},
        "objects_per_second": round(fitted / span, 4) if span > 0 else None,
        "actor_cpu_seconds": round(sum(r["cpu_seconds"] for r in summaries), 3),
    }


def _pipeline(pending: list[ObjectSource], cfg: P2NConfig, out_uri: str, opts: dict[str, Any], progress: bool):
    import ray
    import ray.data

    ds_cfg = cfg.dataset
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = 0  # a batch that still fails after its retries fails the run (rows are never lost)
    workers = min(ds_cfg.workers, len(pending))
    cpus = cpus_per_worker(ds_cfg.cpus_per_worker, workers)
    threads = cfg.dataset.torch_threads or max(1, math.floor(cpus))
    per_shard = ds_cfg.objects_per_shard
    items = [s.to_dict() for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_shard)))
    with warnings.catch_warnings():
        # max_restarts/max_task_retries can only be passed as ray_remote_args, deprecated for Ray 2.64 (we pin
        # 2.60). Without them Ray Data restarts a dead actor and retries its batch forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(
            FitActor,
            fn_constructor_kwargs={"cfg": cfg.to_dict(), "out_uri": out_uri, "storage_options": opts,
                                   "torch_threads": threads, "kill_once": os.environ.get("P2N_BUILD_KILL_ONCE")},
            batch_size=per_shard,
            compute=ray.data.ActorPoolStrategy(size=workers,
                                               max_tasks_in_flight_per_actor=ds_cfg.batches_in_flight),
            num_cpus=cpus,
            num_gpus=ds_cfg.gpus_per_worker or None,
            max_restarts=ds_cfg.max_retries,
            max_task_retries=ds_cfg.max_retries,
        )


def main(argv: list[str] | None = None) -> int:
    from p2n.cli.dataset import add_build_arguments, build_kwargs

    return job_main("build_dataset.py", __doc__, add_build_arguments, build_kwargs, build, argv)


if __name__ == "__main__":
    sys.exit(main())
