"""The p2n service over real HTTP on 127.0.0.1: one Ray + Serve for the whole module (``ray.init(num_cpus=2)``,
fractional CPUs per replica), with an API key set.

Generation from text and images matches the model run locally (so the service serves the checkpoint, batched
or not); artefacts come inline or as URLs; a refinement job runs from start to result and can be cancelled;
56 malformed requests each get a 4xx JSON error naming the problem and leave every replica alive; the API key is
enforced; the web page works in a real headless browser; killing every Generator replica mid-load is recovered
from within a bounded time, and a job whose Refiner replica is killed resumes elsewhere from its checkpoint.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pngs import png_header_only

from tiny_generator import SERVICE, free_port

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

API_KEY = "p2n-test-key-7f3a"
G = "/v1/generate"
HEX = "0123456789abcdef0123456789abcdef"


# ---- fixtures ------------------------------------------------------------------------------------------------
def replicas(deployment: str) -> list[str]:
    """Names of the live replica actors of one deployment of the p2n application."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::p2n#{deployment}#"))


@pytest.fixture(scope="module")
def service(tiny_ckpt, tmp_path_factory):
    from serve import app as serve_app

    if ray.is_initialized():  # the key must reach the replicas through the environment Ray starts them with
        ray.shutdown()
    store = tmp_path_factory.mktemp("store")
    saved = os.environ.get("P2N_API_KEY")
    os.environ["P2N_API_KEY"] = API_KEY
    try:
        t = time.perf_counter()
        url = serve_app.start(str(tiny_ckpt), "127.0.0.1", free_port(), overrides=SERVICE, store=str(store),
                              num_cpus=2, log_level="WARNING")
        startup_s = time.perf_counter() - t
        yield SimpleNamespace(url=url, store=store, ckpt=tiny_ckpt, startup_s=startup_s,
                              at_start={d: replicas(d) for d in ("API", "Generator", "Renderer", "Refiner")})
    finally:
        serve_app.stop()
        if saved is None:
            os.environ.pop("P2N_API_KEY", None)
        else:
            os.environ["P2N_API_KEY"] = saved


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_ckpt):
    """The same checkpoint run in this process: what the service must reproduce."""
    from p2n.generate import Generator

    return Generator.load(str(tiny_ckpt))


def png(w: int, h: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def params_of(out: dict, field):
    from p2n.nerf.params import params_from_bytes

    flat, _, meta = params_from_bytes(base64.b64decode(out["data"]), field)
    return flat, meta


# ---- basics --------------------------------------------------------------------------------------------------
def test_health_models_and_docs(service, client, local):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["layout_hash"] == local.cfg.field.layout_hash()
    m = client.get("/v1/models").json()
    assert m["num_params"] == local.vae.num_params and m["latent_dim"] == 16
    assert m["text_encoder"] == "tiny-clip" and m["supports_images"] is True
    assert m["limits"]["max_image_bytes"] == 262144 and m["limits"]["max_refine_steps"] == 400  # from overrides
    assert "multiview" in m["guidances"] and m["checkpoint"] == str(service.ckpt)
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/refine", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    status = client.get("/v1/status").json()["deployments"]
    assert {d: s.get("RUNNING") for d, s in status.items()} == {"API": 1, "Generator": 1, "Renderer": 1, "Refiner": 1}


def test_generate_from_text_returns_every_artefact(client, local):
    import trimesh

    r = client.post(G, json={"prompt": "a red cube", "outputs": ["params", "latent", "views", "turntable", "mesh"],
                             "views": 3, "frames": 6, "size": 32, "mesh_resolution": 32})
    assert r.status_code == 200, r.text
    body = r.json()
    out = body["outputs"]
    params, meta = params_of(out["params"], local.cfg.field)
    expected = local.from_prompts(["a red cube"])
    assert torch.allclose(params, expected.params[0], atol=1e-5)  # the service runs this very checkpoint
    assert meta["prompt"] == "a red cube" and out["params"]["num_params"] == local.vae.num_params
    assert np.allclose(out["latent"], expected.latents[0].numpy(), atol=1e-5)
    views = [Image.open(io.BytesIO(base64.b64decode(d))) for d in out["views"]["data"]]
    assert [v.size for v in views] == [(32, 32)] * 3
    assert len({np.asarray(v).tobytes() for v in views}) == 3  # three different viewpoints
    gif = Image.open(io.BytesIO(base64.b64decode(out["turntable"]["data"])))
    assert gif.format == "GIF" and gif.size == (32, 32) and gif.n_frames == 6
    mesh = trimesh.load(io.BytesIO(base64.b64decode(out["mesh"]["data"])), file_type="glb", force="mesh")
    assert len(mesh.vertices) == out["mesh"]["vertices"] > 0 and len(mesh.faces) == out["mesh"]["faces"] > 0
    t = body["timings"]
    assert 0 < t["generate_ms"] < t["generator_call_ms"] <= t["total_ms"]
    assert set(t["render_ms"]) == {"views", "turntable", "mesh"}


def test_generate_from_image_png_jpeg_and_data_url(client, local):
    from p2n.generate import decode_image

    data = png(40, 32, seed=1)
    r = client.post(G, json={"image": b64(data), "outputs": ["params", "latent"]})
    assert r.status_code == 200, r.text
    expected = local.from_images(decode_image(data))
    assert np.allclose(r.json()["outputs"]["latent"], expected.latents[0].numpy(), atol=1e-4)
    assert r.json()["input"] == {"kind": "image", "bytes": len(data)}
    r2 = client.post(G, json={"image": "data:image/png;base64," + b64(data), "outputs": ["latent"]})
    assert r2.json()["outputs"]["latent"] == r.json()["outputs"]["latent"]
    r3 = client.post(G, json={"image": b64(png(48, 48, seed=2, fmt="JPEG")), "outputs": ["latent"]})
    assert r3.status_code == 200 and r3.json()["outputs"]["latent"] != r.json()["outputs"]["latent"]
    text = client.post(G, json={"prompt": "a red cube", "outputs": ["latent"]}).json()["outputs"]["latent"]
    assert text != r.json()["outputs"]["latent"]


def test_concurrent_requests_are_batched_without_mixing_results(client, local):
    prompts = [f"a {c} {s}" for c in ("red", "green", "blue", "pink") for s in ("cube", "sphere", "cone", "torus")]

    def ask(p: str) -> dict:
        return client.post(G, json={"prompt": p, "outputs": ["latent"]}).json()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    expected = local.latents_from_prompts(prompts).numpy()
    for p, a, e in zip(prompts, answers, expected):
        assert np.allclose(a["outputs"]["latent"], e, atol=1e-4), p  # each answer is its own prompt's
    assert max(a["timings"]["batch_size"] for a in answers) > 1  # some requests shared a forward pass


def test_artefacts_as_download_urls(client):
    r = client.post(G, json={"prompt": "a green torus", "outputs": ["params", "turntable", "views"], "views": 2,
                             "frames": 4, "size": 24, "delivery": "url"})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"]
    assert "data" not in out["turntable"] and out["turntable"]["url"].startswith("/v1/artefacts/")
    gif = client.get(out["turntable"]["url"])
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert Image.open(io.BytesIO(gif.content)).n_frames == 4
    params = client.get(out["params"]["url"])
    assert len(params.content) == out["params"]["bytes"] and params.content[8:9] == b"{"  # a safetensors header
    assert [client.get(u).status_code for u in out["views"]["urls"]] == [200, 200]


# ---- malformed requests --------------------------------------------------------------------------------------
def _raw(data: bytes, ctype: str = "application/json") -> dict:
    return {"content": data, "headers": {"content-type": ctype}}


def _chunks(total: int):
    for _ in range(total // 65536):
        yield b"x" * 65536


def _solid_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


TRUNCATED = png(64, 64, seed=3)[:400]
BIG_PNG = _solid_png(1100, 1000)  # 1.1 M pixels (> serve.max_image_pixels = 1 M) in a few kilobytes
MALFORMED = [
    # (id, method, path, request kwargs, status, expected error code, text the message must contain)
    ("bad-json", "POST", G, _raw(b'{"prompt": '), 400, "invalid_json", "not valid JSON"),
    ("json-array", "POST", G, _raw(b'["a red cube"]'), 422, "invalid_request", ""),
    ("json-string", "POST", G, _raw(b'"a red cube"'), 422, "invalid_request", ""),
    ("empty-body", "POST", G, _raw(b""), 422, "invalid_request", "required"),
    ("not-utf8", "POST", G, _raw(b'{"prompt": "\xff\xfe"}'), 400, None, ""),
    ("text-plain", "POST", G, _raw(b'{"prompt": "a"}', "text/plain"), 415, "unsupported_media_type",
     "application/json"),
    ("prompt-int", "POST", G, {"json": {"prompt": 42}}, 422, "invalid_request", "prompt"),
    ("prompt-list", "POST", G, {"json": {"prompt": ["a red cube"]}}, 422, "invalid_request", "prompt"),
    ("prompt-null", "POST", G, {"json": {"prompt": None}}, 422, "invalid_request", "exactly one"),
    ("unknown-field", "POST", G, {"json": {"prompt": "a red cube", "colour": "red"}}, 422, "invalid_request", "colour"),
    ("both-inputs", "POST", G, {"json": {"prompt": "a", "image": b64(png(16, 16))}}, 422, "invalid_request",
     "exactly one"),
    ("no-input", "POST", G, {"json": {"outputs": ["params"]}}, 422, "invalid_request", "exactly one"),
    ("empty-prompt", "POST", G, {"json": {"prompt": ""}}, 422, "prompt_error", "empty prompt"),
    ("blank-prompt", "POST", G, {"json": {"prompt": "  \n\t "}}, 422, "prompt_error", "empty prompt"),
    ("huge-prompt", "POST", G, {"json": {"prompt": "a" * 5000}}, 422, "prompt_too_long", "5000 characters"),
    ("too-many-tokens", "POST", G, {"json": {"prompt": " ".join(["cube"] * 199)}}, 422, "prompt_too_long", "tokens"),
    ("control-char", "POST", G, {"json": {"prompt": "a red\x07 cube"}}, 422, "prompt_error", "U+0007"),
    ("nul-char", "POST", G, {"json": {"prompt": "a\x00b"}}, 422, "prompt_error", "U+0000"),
    ("lone-surrogate", "POST", G, _raw(b'{"prompt": "a \\ud800 cube"}'), 422, "invalid_prompt", "Unicode"),
    ("bad-base64", "POST", G, {"json": {"image": "!!! not base64 !!!"}}, 422, "invalid_base64", "base64"),
    ("not-an-image", "POST", G, {"json": {"image": b64(b"hello, I am plain text")}}, 422, "invalid_image",
     "not a readable image"),
    ("one-pixel", "POST", G, {"json": {"image": b64(png(1, 1))}}, 422, "image_error", "too small"),
    ("huge-pixels", "POST", G, {"json": {"image": b64(BIG_PNG)}}, 422, "image_too_large", "pixels"),
    # a 70-byte header claiming 20000x20000: Pillow refuses it before the size is known
    ("bomb-header", "POST", G, {"json": {"image": b64(png_header_only(20000, 20000))}}, 422, "image_too_large",
     "pixels"),
    ("huge-bytes", "POST", G, {"json": {"image": b64(os.urandom(300_000))}}, 422, "image_too_large", "bytes"),
    ("truncated-png", "POST", G, {"json": {"image": b64(TRUNCATED)}}, 422, "image_error", "corrupt"),
    ("data-url-not-image", "POST", G, {"json": {"image": "data:text/plain;base64,aGVsbG8="}}, 422, "invalid_image",
     "data: URL"),
    ("outputs-not-list", "POST", G, {"json": {"prompt": "a", "outputs": "params"}}, 422, "invalid_request", "outputs"),
    ("outputs-unknown", "POST", G, {"json": {"prompt": "a", "outputs": ["video"]}}, 422, "invalid_request", "outputs"),
    ("outputs-empty", "POST", G, {"json": {"prompt": "a", "outputs": []}}, 422, "invalid_request", "outputs"),
    ("outputs-duplicate", "POST", G, {"json": {"prompt": "a", "outputs": ["params", "params"]}}, 422,
     "invalid_request", "duplicates"),
    ("views-zero", "POST", G, {"json": {"prompt": "a", "views": 0}}, 422, "invalid_request", "views"),
    ("views-too-many", "POST", G, {"json": {"prompt": "a", "views": 1000}}, 422, "invalid_request", "views"),
    ("size-string", "POST", G, {"json": {"prompt": "a", "size": "64"}}, 422, "invalid_request", "size"),
    ("size-nan", "POST", G, _raw(b'{"prompt": "a", "size": NaN}'), 422, "invalid_request", "size"),
    ("size-huge", "POST", G, {"json": {"prompt": "a", "size": 100000}}, 422, "invalid_request", "size"),
    ("size-bool", "POST", G, {"json": {"prompt": "a", "size": True}}, 422, "invalid_request", "size"),
    ("mesh-format", "POST", G, {"json": {"prompt": "a", "mesh_format": "obj"}}, 422, "invalid_request",
     "mesh_format"),
    ("delivery", "POST", G, {"json": {"prompt": "a", "delivery": "email"}}, 422, "invalid_request", "delivery"),
    ("get-generate", "GET", G, {}, 405, "method_not_allowed", "GET"),
    ("put-refine", "PUT", "/v1/refine", {"json": {}}, 405, "method_not_allowed", "PUT"),
    ("delete-healthz", "DELETE", "/healthz", {}, 405, "method_not_allowed", "DELETE"),
    ("unknown-route", "GET", "/v1/nope", {}, 404, "not_found", "/v1/nope"),
    ("unknown-job", "GET", f"/v1/jobs/{HEX}", {}, 404, "unknown_job", HEX),
    ("malformed-job-id", "GET", "/v1/jobs/not-a-job", {}, 404, "unknown_job", "32 hex"),
    ("unknown-job-result", "GET", f"/v1/jobs/{HEX}/result", {}, 404, "unknown_job", HEX),
    ("cancel-unknown-job", "DELETE", f"/v1/jobs/{HEX}", {}, 404, "unknown_job", HEX),
    ("job-file-traversal", "GET", f"/v1/jobs/{HEX}/files/..%2F..%2Fjob.json", {}, 404, None, ""),
    ("unknown-artefact", "GET", f"/v1/artefacts/{HEX}/turntable.gif", {}, 404, "not_found", HEX),
    ("oversize-body", "POST", G, _raw(b"{" + b" " * 2_000_000 + b"}"), 413, "body_too_large", "1048576"),
    ("oversize-chunked", "POST", G, {"content": _chunks(2_000_000), "headers": {"content-type": "application/json"}},
     413, "body_too_large", "1048576"),
    ("refine-unknown-guidance", "POST", "/v1/refine", {"json": {"scene": "a red cube", "guidance": "dreamfusion"}},
     422, "unknown_guidance", "multiview"),
    ("refine-zero-steps", "POST", "/v1/refine", {"json": {"scene": "a red cube", "steps": 0}}, 422,
     "invalid_request", "steps"),
    ("refine-too-many-steps", "POST", "/v1/refine", {"json": {"scene": "a red cube", "steps": 100000}}, 422,
     "invalid_request", "400 allowed"),
    ("refine-multiview-no-scene", "POST", "/v1/refine", {"json": {"prompt": "a red cube"}}, 422, "invalid_request",
     "scene"),
    ("refine-bad-init", "POST", "/v1/refine", {"json": {"scene": "a red cube", "init": "random"}}, 422,
     "invalid_request", "init"),
    ("refine-unknown-scene", "POST", "/v1/refine", {"json": {"scene": "a chartreuse dodecahedron"}}, 422,
     "scene_error", "chartreuse"),
    ("refine-nothing", "POST", "/v1/refine", {"json": {}}, 422, "invalid_request", "at least one"),
]
def test_there_are_at_least_30_malformed_cases():
    assert len(MALFORMED) >= 30 and len({m[0] for m in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize("name, method, path, kwargs, status, code, text", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_a_4xx_json_error(client, name, method, path, kwargs, status, code, text):
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    if code:
        assert err["code"] == code, err
    assert text in err["message"], err


def test_still_healthy_after_malformed_requests(service, client):
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.post(G, json={"prompt": "a blue sphere", "outputs": ["latent"]})
    assert r.status_code == 200 and len(r.json()["outputs"]["latent"]) == 16
    for d in ("API", "Generator", "Renderer", "Refiner"):  # no replica died on the way
        assert set(service.at_start[d]) <= set(replicas(d)), d


def test_api_key(service):
    body = {"prompt": "a red cube", "outputs": ["latent"]}
    with httpx.Client(base_url=service.url, timeout=60) as anon:
        assert anon.get("/healthz").status_code == 200  # open: probes and the page need no key
        assert anon.get("/").status_code == 200
        for r in (anon.post(G, json=body), anon.get("/v1/models"),
                  anon.post(G, json=body, headers={"X-API-Key": "wrong"}),
                  anon.post(G, json=body, headers={"Authorization": f"Bearer {API_KEY}x"}),
                  anon.post(G, json=body, headers={"Authorization": API_KEY})):  # no "Bearer "
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        assert anon.post(G, json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert anon.post(G, json=body, headers={"X-API-Key": API_KEY}).status_code == 200


# ---- refinement jobs -----------------------------------------------------------------------------------------
def wait_for(client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 120,
             until=None) -> tuple[dict, list[dict]]:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(s)
        if s["state"] in states or (until is not None and until(s)):
            return s, seen
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {seen[-1]} after {timeout} s")


def test_refine_job_from_start_to_result(client, local):
    r = client.post("/v1/refine", json={"scene": "a red cube", "guidance": "multiview", "steps": 40})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["total_steps"] == 40
    final, seen = wait_for(client, job["id"])
    assert final["state"] == "succeeded", final
    steps = [s["step"] for s in seen]
    assert steps == sorted(steps) and any(0 < s < 40 for s in steps)  # progress was visible while it ran
    assert any("loss" in s for s in seen if s["state"] == "running")
    res = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert res["steps"] == 40 and res["attempts"] == 1
    assert res["psnr_test"] > res["psnr_start"] + 0.5  # refined towards the posed views of the red cube
    from p2n.nerf.params import params_from_bytes

    blob = client.get(res["files"]["params.safetensors"]).content
    params, _, _ = params_from_bytes(blob, local.cfg.field)
    assert torch.isfinite(params).all()
    curve = client.get(res["files"]["curve.json"]).json()["curve"]
    assert [c["step"] for c in curve] == list(range(41))
    assert Image.open(io.BytesIO(client.get(res["files"]["turntable.gif"]).content)).n_frames > 1
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 409  # finished: nothing to cancel


def test_cancel_a_running_job(client):
    job = client.post("/v1/refine", json={"scene": "a blue sphere", "steps": 400, "init": "mean"}).json()
    wait_for(client, job["id"], until=lambda s: s["state"] == "running" and s["step"] > 0, timeout=60)
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    final, _ = wait_for(client, job["id"], timeout=30)
    assert final["state"] == "cancelled" and final["step"] < 400
    r = client.get(f"/v1/jobs/{job['id']}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_cancelled"


# ---- the web page in a real browser ------------------------------------------------------------------------
def chromium_path() -> str | None:
    for p in (os.environ.get("P2N_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
              shutil.which("chromium"), shutil.which("chromium-browser")):
        if p and os.access(p, os.X_OK):
            return p
    return None


def test_web_page_generates_and_refines_in_a_browser(service):
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium: run scripts/install_browser.sh (Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-extensions", "--no-first-run"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(service.url + "/", timeout=30000)
            assert page.title().startswith("p2n")
            page.fill("#apikey", API_KEY)
            page.dispatch_event("#apikey", "change")
            page.fill("#prompt", "a blue sphere")
            page.click("#generate")
            page.wait_for_function("() => { const i = document.getElementById('turntable');"
                                   " return i.complete && i.naturalWidth > 0 }", timeout=90000)
            w, h = page.eval_on_selector("#turntable", "i => [i.naturalWidth, i.naturalHeight]")
            assert w > 0 and h > 0 and (w, h) == (64, 64)
            assert page.get_attribute("#mesh", "href").startswith("data:model/gltf-binary;base64,")
            assert page.inner_text("#error") == ""
            page.fill("#steps", "20")
            page.click("#refine")
            page.wait_for_function("() => { const i = document.getElementById('refined');"
                                   " return i.complete && i.naturalWidth > 0 }", timeout=90000)
            assert "succeeded" in page.inner_text("#job-status")
            assert page.eval_on_selector("#progress", "p => p.value") == 1
            assert page.inner_text("#error") == "" and errors == []
        finally:
            browser.close()


# ---- failures ------------------------------------------------------------------------------------------------
def test_killing_every_generator_replica_mid_load_is_recovered_from(service, client):
    victims = replicas("Generator")
    assert victims
    results: list[tuple[float, float, object]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=service.url, headers={"X-API-Key": API_KEY}, timeout=90) as c:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    r = c.post(G, json={"prompt": "a cyan cone", "outputs": ["latent"]})
                    results.append((t, time.monotonic(), r.status_code))
                except httpx.HTTPError as e:
                    results.append((t, time.monotonic(), type(e).__name__))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for th in threads:
        th.start()
    time.sleep(1.5)
    t_kill = time.monotonic()
    for name in victims:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    try:
        deadline = t_kill + 60
        while time.monotonic() < deadline and not any(t0 > t_kill + 0.5 and s == 200 for t0, _, s in results):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=120)
    recovered = [t1 for t0, t1, s in results if t0 > t_kill + 0.5 and s == 200]
    assert recovered, f"no successful request within 60 s of the kill: {results[-5:]}"
    assert min(recovered) - t_kill < 60
    statuses = {s for _, _, s in results}
    assert statuses <= {200, 503}, statuses  # a dying replica costs at most a 503, never a hang or a 500
    assert any(t0 < t_kill and s == 200 for t0, _, s in results)
    new = replicas("Generator")
    assert new and not set(new) & set(victims)
    for _ in range(5):
        assert client.post(G, json={"prompt": "a red cube", "outputs": ["latent"]}).status_code == 200
    assert client.get("/healthz").json()["status"] == "ok"


def test_a_job_whose_refiner_replica_is_killed_resumes_elsewhere(service, client):
    a = client.post("/v1/refine", json={"scene": "a red cube", "steps": 150}).json()
    b = client.post("/v1/refine", json={"scene": "a green cone", "steps": 30, "init": "mean"}).json()
    wait_for(client, a["id"], until=lambda s: s["step"] >= 12, timeout=90)
    state = json.loads((Path(service.store) / "jobs" / a["id"] / "state.json").read_text())
    owner = state["owner"]
    assert owner and owner.startswith("SERVE_REPLICA::p2n#Refiner#")
    ray.kill(ray.get_actor(owner, namespace="serve"), no_restart=True)
    final_a, seen = wait_for(client, a["id"], timeout=150)
    final_b, _ = wait_for(client, b["id"], timeout=60)
    assert final_a["state"] == "succeeded" and final_b["state"] == "succeeded"  # no accepted job was lost
    assert final_a["attempts"] >= 2
    resumed = final_a["resumed_from_step"]
    assert resumed >= 10 and resumed % 5 == 0, final_a  # from the last checkpoint on the store, not from 0
    assert final_a["resumes"][0]["from_step"] == resumed
    res = client.get(f"/v1/jobs/{a['id']}/result").json()
    assert res["steps"] == 150 and res["resumed_from_step"] == resumed
    curve = client.get(res["files"]["curve.json"]).json()["curve"]
    assert [c["step"] for c in curve] == list(range(151))  # one record per step, none lost or doubled
    assert owner not in replicas("Refiner")
