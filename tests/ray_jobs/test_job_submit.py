"""ray_jobs/ as users run them: `ray job submit --working-dir . -- python ray_jobs/build_dataset.py` (and
`ray_jobs/train_vae.py`, `ray_jobs/generate_batch.py`)
against a local `ray start --head` cluster (127.0.0.1 only, free ports, its own temp dir).

Teardown stops exactly the cluster this test started: `ray start --block` runs in its own process group, and the
group gets SIGTERM (then SIGKILL). `ray stop` is not used on purpose: it stops every Ray on the machine, including
other people's sessions on a shared host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["fit.steps=40", "fit.lr=0.03", "fit.rays_per_step=1024", "scene.num_train_views=12", "scene.num_test_views=3",
        "scene.image_size=24"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # the dashboard answers (401 without the token): it is up
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster with 2 CPUs; yields the job API address (http://127.0.0.1:<dashboard port>)."""
    gcs, dash, client, agent, agent_grpc, metrics, node_mgr, obj_mgr = free_ports(8)
    temp_dir = tempfile.mkdtemp(prefix="p2nray", dir="/tmp")  # short: Ray's unix sockets live under it
    # Ray 2.60 clusters require a token (~/.ray/auth_token); the job CLI sends it only in token mode.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # (Ray maps a loopback --node-ip-address to this host's own interface address for its internal gRPC.)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard", "true", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--temp-dir", temp_dir, "--disable-usage-stats"]
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_for(f"{address}/api/version", 120, proc)
        yield {"address": address, "env": env, "temp_dir": temp_dir}
    finally:
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # the group of the `ray start` this fixture launched, and nothing else
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(proc.pid):
                time.sleep(0.5)
                proc.poll()
            if not _group_alive(proc.pid):
                break
        proc.poll()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def test_ray_job_submit_builds_a_dataset(cluster, tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    from p2n.config import P2NConfig

    P2NConfig().override(TINY).to_yaml(cfg_path)
    out = tmp_path / "ds"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", ".",
           "--", "python", "ray_jobs/build_dataset.py", "--out", str(out), "--num-objects", "2", "--workers", "2",
           "--gpus-per-worker", "0", "--config", str(cfg_path), "--no-progress"]
    res = subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]
    summary = next(json.loads(line) for line in log.splitlines() if line.startswith('{"out"'))
    assert summary["fitted"] == 2 and summary["fitted_ok"] == 2 and summary["complete"] is True

    from p2n.data import open_dataset

    ds = open_dataset(str(out))
    assert ds.manifest["counts"]["ok"] == 2 and ds.manifest["config"]["fit"]["steps"] == 40
    # The upload honoured .gitignore/.rayignore: the unpacked working dir has the code, no .venv/.git, a few MB.
    pkgs = [p for p in Path(cluster["temp_dir"]).glob("session_*/runtime_resources/working_dir_files/*")
            if (p / "ray_jobs" / "build_dataset.py").is_file()]
    assert pkgs, "the job's working dir was not found on the cluster"
    for pkg in pkgs:
        assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 20 * 2**20, f"{size / 2**20:.1f} MiB uploaded"


def test_ray_job_submit_trains_the_vae(cluster, tmp_path, tiny_dataset, tiny_cfg):
    """Stage 1 as the cluster README runs it: `ray job submit ... -- python ray_jobs/train_vae.py --data DS --out OUT
    --workers 2` (Ray Train + DeepSpeed, 2 workers over gloo), then the exported VAE reconstructs a dataset row."""
    import torch

    from p2n.data import open_dataset
    from p2n.data.reader import row_params
    from p2n.latent import decode, encode, load_vae

    cfg_path = tmp_path / "tiny.yaml"
    tiny_cfg.override(["vae.steps=60", "train.log_every=20", "train.checkpoint_every=30"]).to_yaml(cfg_path)
    out = tmp_path / "vae"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", ".",
           "--", "python", "ray_jobs/train_vae.py", "--data", str(tiny_dataset), "--out", str(out),
           "--workers", "2", "--gpus-per-worker", "0", "--config", str(cfg_path)]
    res = subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=420)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]
    summary = next(json.loads(line) for line in log.splitlines() if line.startswith('{"stage"'))
    assert summary["stage"] == "vae" and summary["workers"] == 2
    m = summary["metrics"]
    assert m["step"] == 60 and m["done"] is True, m
    assert m["backend"] == "deepspeed" and m["engine"] == "DeepSpeedEngine" and m["comm_backend"] == "gloo", m
    assert (out / "vae.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert Path(summary["files"]["last_checkpoint"]).is_dir(), summary["files"]

    vae = load_vae(str(out))
    row = next(open_dataset(str(tiny_dataset)).rows())
    params = row_params(row)[0].unsqueeze(0)
    recon = decode(vae, encode(vae, params))
    assert recon.shape == params.shape and torch.isfinite(recon).all()


def test_ray_job_submit_generates_a_prompts_file(cluster, tmp_path):
    """Batch generation as users run it on a cluster: `ray job submit ... -- python ray_jobs/generate_batch.py`;
    every prompt gets a row whose parameters load back (the serve tests' tiny generator as the checkpoint)."""
    import importlib.util

    from p2n.generate_batch import read_generations
    from p2n.nerf.params import params_from_bytes

    spec = importlib.util.spec_from_file_location("tiny_generator_for_jobs", REPO / "tests/serve/tiny_generator.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    ckpt = tiny.build_tiny_generator(tmp_path / "ckpt")
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n\na green cone\n")
    out = tmp_path / "gens"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", ".",
           "--", "python", "ray_jobs/generate_batch.py", "--ckpt", str(ckpt), "--prompts", str(tmp_path / "prompts.txt"),
           "--out", str(out), "--workers", "1", "--batch-size", "2", "--views", "1", "--no-progress",
           *[a for s in tiny.SCENE for a in ("--set", s)]]
    res = subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]
    summary = next(json.loads(line) for line in log.splitlines() if line.startswith('{"out"'))
    assert (summary["prompts"], summary["generated"], summary["failed"], summary["complete"]) == (3, 3, 0, True)
    rows = read_generations(str(out))
    assert [r["prompt"] for r in rows] == ["a red cube", "a blue ball", "a green cone"]
    flats = [params_from_bytes(r["params"])[0] for r in rows]
    assert all(f.isfinite().all() for f in flats) and not bool((flats[0] == flats[1]).all())
