"""``p2n serve`` as a user runs it: a separate process, started outside the repository, with no API key set;
it prints its URL, answers over HTTP on 127.0.0.1 (page, health, generation without a key) and shuts down
cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tiny_generator import SERVICE, free_port

httpx = pytest.importorskip("httpx")
pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def test_p2n_serve_help_lists_its_flags():
    out = subprocess.run([sys.executable, "-m", "p2n", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--ckpt", "--port", "--host", "--store", "--set"):
        assert flag in out.stdout


def test_p2n_serve_runs_until_interrupted(tiny_ckpt, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "P2N_API_KEY"}
    cmd = [sys.executable, "-m", "p2n", "serve", "--ckpt", str(tiny_ckpt), "--port", str(port), "--num-cpus", "2",
           "--store", str(tmp_path / "store")]
    for d in ("refiner", "renderer"):  # scale from zero: fewer processes to start on a 2-core machine
        cmd += ["--set", f"serve.{d}.min_replicas=0", "--set", f"serve.{d}.initial_replicas=0"]
    for o in SERVICE:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        info = None
        while time.monotonic() < deadline and info is None and proc.poll() is None:
            for ln in list(lines):
                if ln.startswith("{") and '"url"' in ln:
                    info = json.loads(ln)
            time.sleep(0.2)
        assert info is not None, "".join(lines[-40:])
        url = info["url"]
        assert url == f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            assert "<title>p2n" in c.get("/").text
            r = c.post("/v1/generate", json={"prompt": "a red cube", "outputs": ["params", "latent"]})
            assert r.status_code == 200, r.text  # no P2N_API_KEY in its environment: no key needed
            assert r.json()["outputs"]["params"]["num_params"] > 0
            status = c.get("/v1/status").json()["deployments"]
            assert status["Refiner"].get("RUNNING", 0) == 0  # scaled to zero until a job arrives
            r = c.post("/v1/generate", json={"prompt": "a red cube", "outputs": ["views"], "views": 2, "size": 16})
            assert r.status_code == 200 and len(r.json()["outputs"]["views"]["data"]) == 2  # Renderer: 0 -> 1
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
        reader.join(timeout=10)
        assert rc == 0, "".join(lines[-40:])
        assert any("shutting down" in ln for ln in lines)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
