"""What ``train_vae.py`` and ``train_align.py`` share: Ray Train ``TorchTrainer`` + DeepSpeed over a dataset read
with Ray Data, checkpoints to a local folder or ``s3://`` under ``OUT/checkpoints``, fault tolerance, export.

Driver (:func:`train`): connect to (or start) Ray, read the dataset's parquet shards with
``ray.data.read_parquet`` (status "ok" rows), and start ``train.workers`` workers with
``RunConfig(storage_path=OUT/checkpoints, storage_filesystem=...)`` and ``FailureConfig(max_failures=...)``.
``--resume`` continues the run already under ``OUT/checkpoints/<stage>`` (Ray Train restores its latest
checkpoint); without it, a previous run there is deleted and training starts over.

Worker (:func:`_worker`): every worker reads the whole (small, unsplit) dataset stream and keeps its share of the
objects (``p2n.train.shard_ids``: every W-th sorted id, nothing dropped), builds the stage from ``p2n.train``,
restores ``ray.train.get_checkpoint()`` when there is one, runs the shared loop (which reports metrics and a
checkpoint every ``train.checkpoint_every`` steps from every worker: DeepSpeed state per rank, model file from
rank 0), and rank 0 exports the final model, ``metrics.jsonl`` and ``loss.png`` to ``OUT``.

Fault injection for tests: ``P2N_TEST_KILL_AT_STEP=N`` and ``P2N_TEST_KILL_MARKER=PATH`` in the driver's
environment make rank 0 ``os._exit(1)`` after step N, once (the marker file records that it happened), waiting
``P2N_TEST_KILL_DELAY_S`` (5) seconds first so Ray Train has registered the last checkpoint.

No model, loss or data logic lives here: that is ``p2n/train``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable (see _common.ensure_repo_on_path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_jobs._common import ensure_repo_on_path, init_ray, pyarrow_filesystem  # noqa: E402

ensure_repo_on_path()

from p2n.config import P2NConfig  # noqa: E402
from p2n.data import open_dataset, storage  # noqa: E402
from p2n.data.schema import SHARDS_DIR  # noqa: E402
from p2n.train.data import TrainError  # noqa: E402

STAGES = ("vae", "align")
CHECKPOINTS_DIR = "checkpoints"
KILL_STEP_ENV, KILL_MARKER_ENV, KILL_DELAY_ENV = "P2N_TEST_KILL_AT_STEP", "P2N_TEST_KILL_MARKER", "P2N_TEST_KILL_DELAY_S"
# What the workers read: everything but the fitting statistics.
COLUMNS = ["object_id", "split", "captions", "heldout_captions", "params", "status", "views_png", "cameras"]


# ---- the driver ---------------------------------------------------------------------------------------------------
def train(stage: str, data_uri: str, out_uri: str, cfg: P2NConfig, vae_uri: str | None = None,
          workers: int | None = None, gpus_per_worker: float | None = None, resume: bool = False,
          storage_options: dict[str, Any] | str | None = None, address: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train one stage on Ray; returns a summary (final metrics, written files, seconds)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.time()
    if stage not in STAGES:
        raise TrainError(f"unknown stage {stage!r}; use one of {STAGES}")
    opts = storage.parse_storage_options(storage_options)
    data_uri, out_uri, vae_uri = storage.absolute(data_uri), storage.absolute(out_uri), storage.absolute(vae_uri)
    if workers is not None:
        cfg = cfg.override([f"train.workers={int(workers)}"])
    if gpus_per_worker is not None:
        cfg = cfg.override([f"train.gpus_per_worker={float(gpus_per_worker)}"])
    tc = cfg.train
    if tc.workers < 1:
        raise TrainError(f"--workers must be >= 1, got {tc.workers}")
    if stage == "align" and not vae_uri:
        raise TrainError("training the aligner needs --vae URI: the --out of `p2n train vae`")

    reader = open_dataset(data_uri, opts)  # the manifest: which objects, which layout
    train_ids = list(reader.manifest.get("splits", {}).get("train", []))
    val_ids = list(reader.manifest.get("splits", {}).get("heldout", []))
    if len(train_ids) < tc.workers:
        raise TrainError(f"{data_uri} has {len(train_ids)} training objects with status ok, fewer than --workers "
                         f"{tc.workers}; use fewer workers or a bigger dataset")
    if stage == "align":
        from p2n.latent import load_vae

        vae = load_vae(vae_uri, opts)  # fail here, not in every worker, when --vae is wrong
        if reader.field_config is not None and vae.layout_hash != reader.field_config.layout_hash():
            raise TrainError(f"--vae {vae_uri} was trained on field layout {vae.layout_hash}, {data_uri} has "
                             f"{reader.field_config.layout_hash()}; train the VAE on this dataset first")

    started_ray = init_ray(address)
    try:
        fs_data, data_root = storage.url_to_fs(data_uri, opts)
        shards = storage.join(data_root, SHARDS_DIR)
        read_fs = None if storage.is_local(fs_data) else pyarrow_filesystem(fs_data)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # workers read a few rows once; bars would only clutter the job log
        ctx.print_on_execution_start = False
        # Read once here, while the cluster is idle, and hand the workers blocks in the object store: a read
        # started inside each worker competes with the other workers for CPU (12-13 s for 32 objects on 2 cores).
        ds = ray.data.read_parquet(shards, filesystem=read_fs, columns=COLUMNS).filter(expr="status == 'ok'")
        ds = ds.materialize()

        fs_out, out_root = storage.url_to_fs(out_uri, opts)
        run_root = storage.join(out_root, CHECKPOINTS_DIR)
        run_dir = storage.join(run_root, stage)
        if storage.exists(fs_out, run_dir):
            if resume:
                print(f"p2n train {stage}: resuming the run in {out_uri}/{CHECKPOINTS_DIR}/{stage}", flush=True)
            else:
                print(f"p2n train {stage}: {out_uri}/{CHECKPOINTS_DIR}/{stage} holds an earlier run; starting over "
                      "(pass --resume to continue it)", flush=True)
                fs_out.rm(run_dir, recursive=True)
        if storage.is_local(fs_out):
            os.makedirs(run_root, exist_ok=True)
        on_gpu = tc.gpus_per_worker > 0
        cpus = tc.cpus_per_worker if tc.cpus_per_worker is not None else (1.0 if on_gpu else 0.5)
        resources = {"CPU": cpus, **({"GPU": tc.gpus_per_worker} if on_gpu else {})}
        loop_config = {
            "stage": stage, "cfg": cfg.to_dict(), "train_ids": train_ids, "val_ids": val_ids,
            "out_uri": out_uri, "vae_uri": vae_uri, "storage_options": opts, "data_uri": data_uri,
            "fault": _fault_from_env(),
        }
        trainer = TorchTrainer(
            _worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=tc.workers, use_gpu=on_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=stage, storage_path=run_root, storage_filesystem=None if storage.is_local(fs_out)
                else pyarrow_filesystem(fs_out),
                checkpoint_config=CheckpointConfig(num_to_keep=max(tc.keep_checkpoints, 1)),
                failure_config=FailureConfig(max_failures=tc.max_failures),
            ),
            datasets={"objects": ds},
            dataset_config=DataConfig(datasets_to_split=[]),  # each worker picks its share (nothing dropped)
        )
        result = trainer.fit()
        if result.error is not None:
            raise TrainError(f"p2n train {stage} failed: {result.error}")
        metrics = dict(result.metrics or {})
    finally:
        if started_ray:
            ray.shutdown()
    files = {"model": f"{out_uri.rstrip('/')}/{'vae' if stage == 'vae' else 'align'}.safetensors",
             "metrics": f"{out_uri.rstrip('/')}/metrics.jsonl", "loss_plot": f"{out_uri.rstrip('/')}/loss.png",
             "checkpoints": f"{out_uri.rstrip('/')}/{CHECKPOINTS_DIR}/{stage}"}
    if stage == "align":
        files["vae"] = f"{out_uri.rstrip('/')}/vae.safetensors"
    if result.checkpoint is not None:
        files["last_checkpoint"] = result.checkpoint.path
    return {"stage": stage, "out": out_uri, "workers": tc.workers, "seconds": round(time.time() - t0, 2),
            "metrics": metrics, "files": files}


def _fault_from_env() -> dict[str, Any] | None:
    step = os.environ.get(KILL_STEP_ENV)
    if not step:
        return None
    marker = os.environ.get(KILL_MARKER_ENV) or os.path.join(tempfile.gettempdir(), "p2n-kill-marker")
    return {"step": int(step), "marker": marker, "rank": 0, "delay_s": float(os.environ.get(KILL_DELAY_ENV, "5"))}


# ---- a worker -----------------------------------------------------------------------------------------------------
def _worker(config: dict[str, Any]) -> None:
    t_start = time.time()
    import ray.train
    import ray.train.torch
    import torch

    from p2n.train import AlignStage, VAEStage, records_from_rows, run, shard_ids

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = P2NConfig.from_dict(config["cfg"])
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    device = ray.train.torch.get_device()
    opts = config["storage_options"]

    mine = set(shard_ids(config["train_ids"], rank, world)) | set(shard_ids(config["val_ids"], rank, world))
    rows = []
    for table in ray.train.get_dataset_shard("objects").iter_batches(batch_size=8, batch_format="pyarrow"):
        rows += [r for r in table.to_pylist() if r["object_id"] in mine]
    records, field = records_from_rows(rows)
    t_data = time.time()
    train_recs = [r for r in records if r.split == "train"]
    val_recs = [r for r in records if r.split != "train"]
    info = {"dataset": config["data_uri"], "workers": world}

    if config["stage"] == "vae":
        stage = VAEStage(cfg, train_recs, val_recs, field, device, info)
    else:
        from p2n.latent import load_vae

        vae = load_vae(config["vae_uri"], opts, expected_field=field)
        stage = AlignStage(cfg, train_recs, val_recs, vae, device, {**info, "vae": config["vae_uri"]},
                           vae_uri=config["vae_uri"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            stage.load(d)
    if rank == 0:  # where a worker's start-up goes (it is most of a short run)
        print(f"[{config['stage']}] " + json.dumps({"kind": "setup", "read_objects_s": round(t_data - t_start, 2),
                                                      "build_engine_s": round(time.time() - t_data, 2)}), flush=True)

    def report(metrics: dict[str, Any], save) -> None:
        with tempfile.TemporaryDirectory(prefix="p2n-ckpt-") as tmp:
            save(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    fault = config.get("fault")

    def maybe_die(step: int) -> None:
        if fault and rank == fault["rank"] and step == fault["step"] and not os.path.exists(fault["marker"]):
            # Ray Train's controller collects reported checkpoints on its health-check poll (every 2 s): die a
            # while after the last checkpoint, as a real crash would, not in the same instant.
            time.sleep(fault["delay_s"])
            with open(fault["marker"], "w") as f:
                f.write(f"killed rank {rank} after step {step}\n")
            os._exit(1)

    def log(rec: dict[str, Any]) -> None:
        print(f"[{config['stage']}] " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                      for k, v in rec.items()}), flush=True)

    run(stage, report=report, fault=maybe_die, log=log)
    if rank == 0:
        stage.export(config["out_uri"], opts)


# ---- command line ---------------------------------------------------------------------------------------------------
def main(stage: str, argv: list[str] | None = None) -> int:
    from p2n.cli.common import print_json
    from p2n.cli.train import add_train_arguments, train_kwargs
    from p2n.errors import P2NError

    p = argparse.ArgumentParser(prog=f"train_{stage}.py", description=__doc__.split("\n\n")[0])
    add_train_arguments(p, stage)
    args = p.parse_args(argv)
    try:
        print_json(train(**train_kwargs(args, stage)))
    except P2NError as e:
        print(f"train_{stage}.py: error: {e}", file=sys.stderr)
        return 2
    return 0
