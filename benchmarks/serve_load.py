"""Benchmark: a bounded open-loop load on ``POST /v1/generate`` of the p2n service, with replica counts over time.

Requests are sent on a fixed schedule (``--rps`` for ``--seconds``), whether or not earlier ones have answered
(open loop: a slow server shows up as latency, not as a politely lower rate); at most ``--max-inflight`` are
outstanding, past that a request is dropped and counted as an error. Replica counts per deployment are sampled
every ``--poll`` seconds: in-process from the Serve controller with ``--ckpt`` (the benchmark starts the service
itself on 127.0.0.1), or from ``GET /v1/status`` with ``--url``. Prints one JSON object: ``p50_ms``, ``p90_ms``,
``p99_ms``, ``errors``, ``achieved_rps``, the server-side forward-pass time and batch sizes, and ``replicas`` (a
time series) with the maximum seen per deployment.

    python benchmarks/serve_load.py --rps 20 --seconds 30 --ckpt outputs/demo/train/align
    python benchmarks/serve_load.py --rps 20 --seconds 30 --url http://127.0.0.1:8000
    python benchmarks/serve_load.py --rps 20 --seconds 30 --tiny            # a tiny random checkpoint, built here
    # loads that need more replicas (autoscaling set to react within seconds): renders on the Renderer ...
    python benchmarks/serve_load.py --tiny --rps 6 --seconds 40 --outputs views --views 4 --size 32 \\
        --set serve.renderer.max_replicas=3 --set serve.renderer.upscale_delay_s=1 \\
        --set serve.renderer.metrics_interval_s=1 --set serve.renderer.look_back_period_s=3
    # ... or more text than one Generator replica keeps under one ongoing request
    python benchmarks/serve_load.py --tiny --rps 60 --seconds 30 --set serve.generator.max_replicas=3 \\
        --set serve.generator.target_ongoing_requests=1 --set serve.generator.upscale_delay_s=1 \\
        --set serve.generator.metrics_interval_s=1 --set serve.generator.look_back_period_s=3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "cyan", "white", "gray", "brown"]
SHAPES = ["sphere", "cube", "cylinder", "cone", "torus", "capsule", "pyramid"]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


class ReplicaSampler:
    """Samples {deployment: RUNNING replicas} every ``period`` s in a thread, from Serve or from /v1/status."""

    def __init__(self, url: str, in_process: bool, period: float, headers: dict):
        self.url, self.in_process, self.period, self.headers = url, in_process, period, headers
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _counts(self) -> dict:
        if self.in_process:
            from serve.app import replica_counts

            counts = replica_counts()
        else:
            import httpx

            counts = httpx.get(f"{self.url}/v1/status", headers=self.headers, timeout=10).json()["deployments"]
        return {name: states.get("RUNNING", 0) for name, states in counts.items()}

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append({"t": round(time.monotonic() - self.t0, 1), **self._counts()})
            except Exception as e:  # a missed sample is not a failed benchmark
                self.samples.append({"t": round(time.monotonic() - self.t0, 1), "error": repr(e)[:120]})
            self.stop.wait(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=15)


async def load(url: str, rps: float, seconds: float, body_for, headers: dict, max_inflight: int,
               timeout: float) -> dict:
    import httpx

    n = int(round(rps * seconds))
    latencies, server_ms, batches, errors = [], [], [], {}
    inflight = 0
    done_times: list[float] = []
    limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal inflight
            inflight += 1
            t = time.perf_counter()
            try:
                r = await client.post("/v1/generate", json=body_for(i))
                if r.status_code == 200:
                    latencies.append((time.perf_counter() - t) * 1000)
                    done_times.append(time.perf_counter() - t0)
                    tm = r.json()["timings"]
                    server_ms.append(tm["generate_ms"])
                    batches.append(tm["batch_size"])
                else:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
            except Exception as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            finally:
                inflight -= 1

        tasks = []
        for i in range(n):
            delay = t0 + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if inflight >= max_inflight:
                errors["dropped"] = errors.get("dropped", 0) + 1
                continue
            tasks.append(asyncio.create_task(one(i)))
        send_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - t0
    ok = len(latencies)
    return {
        "requests": n, "ok": ok, "errors": sum(errors.values()), "error_kinds": errors,
        "achieved_rps": round(ok / max(done_times[-1] if done_times else wall_s, 1e-9), 2),
        "send_seconds": round(send_s, 2), "wall_seconds": round(wall_s, 2),
        "p50_ms": round(percentile(latencies, 50) or 0, 1), "p90_ms": round(percentile(latencies, 90) or 0, 1),
        "p99_ms": round(percentile(latencies, 99) or 0, 1), "max_ms": round(max(latencies, default=0), 1),
        "mean_ms": round(statistics.mean(latencies), 1) if latencies else None,
        "server_generate_ms_p50": round(percentile(server_ms, 50) or 0, 2),
        "mean_batch_size": round(statistics.mean(batches), 2) if batches else None,
        "max_batch_size": max(batches, default=None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running service, e.g. http://127.0.0.1:8000")
    src.add_argument("--ckpt", help="start the service here (127.0.0.1) with this generator checkpoint")
    src.add_argument("--tiny", action="store_true", help="start the service here with a tiny random checkpoint")
    ap.add_argument("--rps", type=float, default=20.0, help="requests per second (default 20)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long to send (default 30)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring (default 3)")
    ap.add_argument("--outputs", default="latent", help="comma-separated outputs per request (default: latent)")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--max-inflight", type=int, default=256, help="outstanding requests before dropping (256)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between replica-count samples")
    ap.add_argument("--port", type=int, default=None, help="--ckpt/--tiny: the port (default: a free one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="--ckpt/--tiny: config override for the service, e.g. serve.generator.max_replicas=2")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    key = os.environ.get("P2N_API_KEY")
    headers = {"X-API-Key": key} if key else {}
    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
    prompts = [f"a {c} {s}" for c in COLOURS for s in SHAPES]

    def body_for(i: int) -> dict:
        return {"prompt": prompts[i % len(prompts)], "outputs": outputs, "views": args.views, "size": args.size}

    started = None
    tmp = None
    url = args.url
    record: dict = {"rps_target": args.rps, "seconds": args.seconds, "outputs": outputs}
    try:
        if url is None:
            from serve import app as serve_app

            ckpt = args.ckpt
            overrides = list(args.overrides)
            if args.tiny:
                sys.path.insert(0, str(ROOT / "tests" / "serve"))
                from tiny_generator import SCENE, build_tiny_generator, free_port

                tmp = tempfile.TemporaryDirectory(prefix="p2n-bench-")
                ckpt = str(build_tiny_generator(Path(tmp.name) / "ckpt"))
                overrides = SCENE + overrides
            else:
                from socket import socket

                def free_port() -> int:
                    with socket() as s:
                        s.bind(("127.0.0.1", 0))
                        return s.getsockname()[1]

            port = args.port or free_port()
            store = tempfile.mkdtemp(prefix="p2n-bench-store-")
            t = time.perf_counter()
            url = serve_app.start(ckpt, "127.0.0.1", port, overrides=overrides, store=store)
            started = serve_app
            record["startup_s"] = round(time.perf_counter() - t, 1)
            record["ckpt"] = ckpt
        record["url"] = url
        if args.warmup > 0:
            asyncio.run(load(url, args.rps, args.warmup, body_for, headers, args.max_inflight, args.timeout))
        with ReplicaSampler(url, started is not None, args.poll, headers) as sampler:
            record.update(asyncio.run(load(url, args.rps, args.seconds, body_for, headers, args.max_inflight,
                                           args.timeout)))
            time.sleep(min(2 * args.poll, 3))
        record["replicas"] = sampler.samples
        names = sorted({k for s in sampler.samples for k in s if k not in ("t", "error")})
        record["replicas_min"] = {n: min(s.get(n, 0) for s in sampler.samples if n in s) for n in names}
        record["replicas_max"] = {n: max(s.get(n, 0) for s in sampler.samples if n in s) for n in names}
    finally:
        if started is not None:
            started.stop()
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(record)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
