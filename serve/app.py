"""The p2n Ray Serve application: a versioned JSON API over generation, rendering and refinement jobs.

Deployments (each autoscaled between its ``serve.<name>`` replica bounds, GPUs per replica when the cluster
has any):

- ``API``        the FastAPI ingress: validation, API key, body limit, artefact delivery, job bookkeeping;
- ``Generator``  loads the checkpoint once; prompts and images are batched (``@serve.batch``) into one forward
                 pass of ``p2n.generate.Generator``;
- ``Renderer``   views, turntable GIFs and meshes of parameter vectors (``p2n.export``);
- ``Refiner``    long refinement jobs (``serve/jobs.py``), state and checkpoints on the artefact store, so a job
                 whose replica dies resumes on another one.

HTTP (OpenAPI at ``/docs``): ``POST /v1/generate``, ``POST /v1/refine``, ``GET|DELETE /v1/jobs/{id}``,
``GET /v1/jobs/{id}/result``, ``GET /v1/jobs/{id}/files/{name}``, ``GET /v1/artefacts/{id}/{name}``,
``GET /v1/models``, ``GET /v1/status``, ``GET /healthz`` and the web page at ``/``.

Run it with ``p2n serve --ckpt DIR``, ``serve run serve.app:app ckpt=DIR`` or ``serve deploy serve/config.yaml``;
:func:`start` / :func:`stop` do the same from Python (tests, benchmark, :func:`demo_request`).

Does not own: any model logic (``p2n``), job records (``serve/jobs.py``) or the store (``serve/store.py``).
"""

import asyncio
import base64
import binascii
import hmac
import importlib
import io
import json
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.exceptions import HTTPException

from p2n.config import P2NConfig, ReplicaConfig, ServeConfig, load_config
from p2n.errors import P2NError
from serve.jobs import ACTIVE, RESULT_FILES, TERMINAL, JobStore, lease_expired, run_job
from serve.store import ArtefactStore

API_VERSION = "1"
APP_NAME = "p2n"
STATIC = Path(__file__).resolve().parent / "static"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")
FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MEDIA_TYPES = {".png": "image/png", ".gif": "image/gif", ".glb": "model/gltf-binary", ".ply": "application/ply",
               ".json": "application/json", ".yaml": "application/yaml", ".safetensors": "application/octet-stream"}
IMAGE_MEDIA = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}
OPEN_PATHS = {"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico"}
REPLICA_DIED = (RayActorError, ActorUnavailableError)

log = logging.getLogger("ray.serve")


# ---------------------------------------------------------------------------------------------------------------
# Application arguments (serve run key=value, serve/config.yaml `args:`, p2n serve flags)
# ---------------------------------------------------------------------------------------------------------------
class AppArgs(BaseModel):
    """What the application builder takes; unknown keys are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")

    ckpt: str = Field(description="generator checkpoint: the --out folder of `p2n train align` (local or s3://)")
    config: str | None = Field(None, description="a p2n config YAML (the `serve:` section sets replicas and limits)")
    overrides: list[str] | str = Field(default_factory=list,
                                       description="SECTION.KEY=VALUE overrides (a list, or one ';'-separated str)")
    store: str | None = Field(None, description="artefact store, a folder or fsspec URI (default: serve.store)")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options for ckpt and store")
    api_key_env: str | None = Field(None, description="env var holding the API key (default: serve.api_key_env)")
    device: str = "auto"

    def p2n_config(self) -> P2NConfig:
        overrides = self.overrides
        if isinstance(overrides, str):
            overrides = [o.strip() for o in overrides.split(";") if o.strip()]
        cfg = load_config(self.config, overrides)
        if self.store:
            cfg.serve.store = self.store
        if self.api_key_env:
            cfg.serve.api_key_env = self.api_key_env
        return cfg


def _gpus_present() -> bool:
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
    except Exception:  # no cluster to ask: this machine decides
        pass
    return torch.cuda.is_available()


def deployment_options(name: str, rc: ReplicaConfig, s: ServeConfig, gpus: bool, use_gpu: bool = True) -> dict:
    """Serve ``.options()`` for one deployment from its ``serve.<name>`` section."""
    autoscaling = {"min_replicas": rc.min_replicas, "max_replicas": rc.max_replicas,
                   "target_ongoing_requests": rc.target_ongoing_requests, "upscale_delay_s": rc.upscale_delay_s,
                   "downscale_delay_s": rc.downscale_delay_s, "look_back_period_s": rc.look_back_period_s,
                   "metrics_interval_s": rc.metrics_interval_s}
    if rc.initial_replicas is not None:
        autoscaling["initial_replicas"] = rc.initial_replicas
    num_gpus = rc.num_gpus if rc.num_gpus is not None else (s.gpus_when_present if (gpus and use_gpu) else 0.0)
    return {"name": name, "max_ongoing_requests": rc.max_ongoing_requests, "autoscaling_config": autoscaling,
            "ray_actor_options": {"num_cpus": rc.num_cpus, "num_gpus": num_gpus},
            "health_check_period_s": s.health_check_period_s}


# ---------------------------------------------------------------------------------------------------------------
# Generator: the checkpoint, loaded once; requests batched into one forward pass
# ---------------------------------------------------------------------------------------------------------------
@serve.deployment(name="Generator")
class GeneratorDeployment:
    def __init__(self, ckpt: str, cfg: dict, storage_options: dict | None = None, device: str = "auto"):
        from p2n.generate import Generator

        c = P2NConfig.from_dict(cfg)
        torch.set_num_threads(c.serve.torch_threads)
        self.gen = Generator.load(ckpt, c, device, storage_options)
        for batched in (self._text_batch, self._image_batch):
            batched.set_max_batch_size(c.serve.max_batch_size)
            batched.set_batch_wait_timeout_s(c.serve.batch_wait_timeout_s)
        self.gen.from_prompts(["warm-up"])  # the first real request should not pay for lazy initialisation

    def info(self) -> dict:
        return {"model": self.gen.describe(), "cfg": self.gen.cfg.to_dict(),
                "supports_images": self.gen.supports_images}

    async def from_prompt(self, prompt: str) -> dict:
        from p2n.generate import check_prompts

        try:
            clean = check_prompts([prompt], self.gen.text_encoder)[0]  # a bad prompt fails alone, not its batch
        except P2NError as e:
            return user_error(e)
        return await self._text_batch(clean)

    async def from_image(self, data: bytes) -> dict:
        from p2n.generate import decode_image

        if not self.gen.supports_images:
            return {"p2n_error": {"code": "images_not_supported",
                                  "message": "this checkpoint has no image encoder; send a text prompt"}}
        try:
            image = await asyncio.to_thread(decode_image, data, "image")
        except P2NError as e:
            return user_error(e)
        return await self._image_batch(image)

    async def mean_params(self) -> np.ndarray:
        return self.gen.mean_params().cpu().numpy()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _text_batch(self, prompts: list[str]) -> list[dict]:
        out = await asyncio.to_thread(self.gen.from_prompts, prompts)
        return _split(out, len(prompts))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _image_batch(self, images: list[torch.Tensor]) -> list[dict]:
        out = await asyncio.to_thread(self.gen.from_images, images)
        return _split(out, len(images))


def user_error(e: Exception) -> dict:
    """A p2n error as a value: the ingress answers 422 with it (raising would log a traceback per bad request)."""
    return {"p2n_error": {"code": _snake(type(e).__name__), "message": str(e)}}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _split(out, n: int) -> list[dict]:
    params, latents = out.params.cpu().numpy(), out.latents.float().cpu().numpy()
    return [{"params": params[i], "latent": latents[i], "generate_ms": out.generate_ms, "batch_size": n}
            for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Renderer: pictures and meshes of parameter vectors
# ---------------------------------------------------------------------------------------------------------------
@serve.deployment(name="Renderer")
class RendererDeployment:
    def __init__(self, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self._cfgs: dict[str, P2NConfig] = {}

    def _cfg(self, cfg: dict) -> P2NConfig:
        key = json.dumps(cfg, sort_keys=True, default=str)
        if key not in self._cfgs:
            self._cfgs = {key: P2NConfig.from_dict(cfg)}
        return self._cfgs[key]

    async def render(self, kind: str, params: np.ndarray, cfg: dict, opts: dict) -> dict:
        try:
            return await asyncio.to_thread(self._render, kind, params, self._cfg(cfg), opts)
        except P2NError as e:  # e.g. an empty field has no surface to mesh
            return user_error(e)

    def _render(self, kind: str, params: np.ndarray, cfg: P2NConfig, opts: dict) -> dict:
        from p2n.config import resolve_device
        from p2n.export import extract_mesh, turntable_frames
        from p2n.viz import save_animation, to_uint8

        t = time.perf_counter()
        p = torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32))
        if kind == "mesh":
            mesh = extract_mesh(p, cfg, int(opts["mesh_resolution"]))
            data = mesh.export(file_type=opts["mesh_format"])
            out = {"data": bytes(data), "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}
        else:
            p = p.to(resolve_device("auto"))
            n = int(opts["views"] if kind == "views" else opts["frames"])
            frames = turntable_frames(p, cfg, n, int(opts["size"])).cpu()
            if kind == "views":
                from PIL import Image

                pngs = []
                for f in frames:
                    buf = io.BytesIO()
                    Image.fromarray(to_uint8(f)).save(buf, format="PNG")
                    pngs.append(buf.getvalue())
                out = {"data": pngs}
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = save_animation(frames, Path(tmp) / "turntable.gif")
                    out = {"data": path.read_bytes(), "frames": n}
        out["render_ms"] = (time.perf_counter() - t) * 1000
        return out


# ---------------------------------------------------------------------------------------------------------------
# Refiner: long jobs whose state lives on the store
# ---------------------------------------------------------------------------------------------------------------
def _actor_alive(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace="serve")
        return True
    except ValueError:
        return False


@serve.deployment(name="Refiner")
class RefinerDeployment:
    def __init__(self, store: str, storage_options: dict | None, settings: dict):
        import ray

        import p2n.refine  # noqa: F401  (registers every guidance before the first job)

        torch.set_num_threads(settings["torch_threads"])
        self.jobs = JobStore(ArtefactStore(store, storage_options))
        self.settings = settings
        ctx = ray.get_runtime_context()
        self.name = ctx.get_actor_name() or f"refiner-{uuid.uuid4().hex[:8]}"

    async def run(self, job_id: str) -> dict:
        """Run or resume ``job_id`` until it ends (or return at once when a live replica already runs it)."""
        return await asyncio.to_thread(run_job, self.jobs, job_id, self.name, _actor_alive,
                                       self.settings["job_lease_s"], self.settings["max_job_attempts"])

    def whoami(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------------------------
# HTTP: request models, errors, middleware
# ---------------------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Output = Literal["params", "latent", "views", "turntable", "mesh"]


class GenerateRequest(_Strict):
    prompt: str | None = Field(None, description="a text prompt, e.g. 'a red cube'")
    image: str | None = Field(None, description="an image prompt: base64 PNG/JPEG, or a data: URL")
    outputs: list[Output] = Field(default_factory=lambda: ["params"], min_length=1, max_length=5,
                                  description="artefacts to return")
    views: int = Field(4, ge=1, description="outputs=views: views around the object")
    frames: int = Field(24, ge=2, le=120, description="outputs=turntable: GIF frames")
    size: int = Field(64, ge=16, description="views and turntable: side in pixels")
    mesh_resolution: int = Field(64, ge=16, le=256, description="outputs=mesh: marching-cubes grid")
    mesh_format: Literal["glb", "ply"] = "glb"
    delivery: Literal["inline", "url"] = Field("inline", description="base64 in the response, or download URLs")

    @model_validator(mode="after")
    def _check(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.image is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'image' (base64 PNG/JPEG)")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"outputs has duplicates: {self.outputs}")
        return self


class RefineRequest(_Strict):
    prompt: str | None = Field(None, description="text prompt (sds, clip; and the 'generated' init)")
    image: str | None = Field(None, description="reference image, base64 PNG/JPEG (zero123, clip)")
    scene: str | None = Field(None, description="procedural scene caption or id: posed views for 'multiview'")
    guidance: str = Field("multiview", description="multiview, sds, zero123 or clip")
    init: Literal["generated", "mean", "scratch"] = "generated"
    steps: int = Field(100, ge=1)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _check(self) -> "RefineRequest":
        if self.prompt is None and self.image is None and self.scene is None:
            raise ValueError("give at least one of 'prompt', 'image' or 'scene'")
        return self


class ApiError(HTTPException):
    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(status, message)
        self.code, self.extra = code, extra


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message, **extra}}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


api = FastAPI(title="p2n", version=API_VERSION, docs_url="/docs", redoc_url=None,
              description="Prompt2NeRF-PIL: a prompt or an image becomes a NeRF in one forward pass; render it, mesh "
                          "it, refine it. Send the API key (when the server has one) as `Authorization: Bearer KEY` "
                          "or `X-API-Key: KEY`.")
# Settings the middleware reads; the API replica's constructor fills them in (one ingress instance per process).
_RUNTIME: dict[str, Any] = {"max_body_bytes": ServeConfig().max_body_bytes, "api_key_env": ServeConfig().api_key_env}


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error(e.status_code, e.code, e.detail, **e.extra)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(e.status_code, "http_error")
    message = {404: f"no such resource: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
    return _error(e.status_code, code, message)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        err = next(err for err in errors if err.get("type") == "json_invalid")
        return _error(400, "invalid_json", f"request body is not valid JSON ({err.get('ctx', {}).get('error', '')} "
                                           f"at position {err['loc'][-1]})")
    details = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        details.append({"field": ".".join(loc) or "body", "message": err.get("msg", ""), "type": err.get("type")})
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    return _error(422, "invalid_request", message, details=details)


@api.exception_handler(P2NError)
async def _p2n_error(request: Request, e: Exception) -> JSONResponse:
    cause = getattr(e, "cause", None) or e  # through a handle, the model's error arrives wrapped (RayTaskError)
    return _error(422, _snake(type(cause).__name__), str(cause))


class _Guard:
    """Outermost ASGI layer: body size limit (413), JSON content type (415), API key (401), and a JSON 500 for
    anything that escapes a route, so one bad request never becomes a non-JSON error or a dead replica."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def reply(resp: JSONResponse):
            await resp(scope, receive, send_tracked)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        limit = int(_RUNTIME["max_body_bytes"])
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            return await reply(_error(400, "bad_content_length", "Content-Length is not an integer"))
        if length > limit:
            return await reply(_error(413, "body_too_large", f"request body has {length} bytes > {limit} allowed; "
                                                             "send a smaller image"))
        key = os.environ.get(_RUNTIME["api_key_env"] or "")
        if key and path not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not given or not hmac.compare_digest(given.encode(), key.encode()):
                return await reply(_error(401, "unauthorized", "missing or wrong API key; send 'Authorization: "
                                                               "Bearer KEY' or 'X-API-Key: KEY'"))
        has_body = bool(length) or "transfer-encoding" in headers
        if method in ("POST", "PUT", "PATCH") and path.startswith("/v1/") and has_body:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await reply(_error(415, "unsupported_media_type",
                                          f"Content-Type must be application/json, got {ctype or 'none'!r}"))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, "body_too_large", f"request body exceeds {limit} bytes; send a smaller image")
            return message

        try:
            await self.app(scope, limited_receive, send_tracked)
        except Exception as e:  # the last line of defence: log it, answer JSON, keep the replica
            log.exception("unhandled error on %s %s", method, path)
            if not started:
                status, code = (503, "unavailable") if isinstance(e, REPLICA_DIED) else (500, "internal")
                await reply(_error(status, code, f"{type(e).__name__}: {e}"[:500]))


api.add_middleware(_Guard)


def _b64_image(value: str, s: ServeConfig, field: str = "image") -> bytes:
    """A base64 (or data: URL) image → bytes, refusing oversize and non-images before any model sees them."""
    from PIL import Image

    b64 = value
    if value.startswith("data:"):
        head, sep, b64 = value.partition(",")
        media = head[5:].split(";")[0].lower()
        if not sep or ";base64" not in head or media not in IMAGE_MEDIA:
            raise ApiError(422, "invalid_image", f"{field}: a data: URL must be data:image/png;base64,... or "
                                                 f"data:image/jpeg;base64,..., got {head[:40]!r}", field=field)
    b64 = re.sub(r"\s+", "", b64)
    if len(b64) * 3 // 4 > s.max_image_bytes + 3:
        raise ApiError(422, "image_too_large", f"{field}: about {len(b64) * 3 // 4} bytes > {s.max_image_bytes} "
                                               "allowed; send a smaller image", field=field)
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", f"{field}: not valid base64; encode the PNG/JPEG file bytes with "
                                              "standard base64", field=field) from None
    if not data:
        raise ApiError(422, "invalid_image", f"{field}: empty image", field=field)
    if len(data) > s.max_image_bytes:
        raise ApiError(422, "image_too_large", f"{field}: {len(data)} bytes > {s.max_image_bytes} allowed; send a "
                                               "smaller image", field=field)
    try:
        w, h = Image.open(io.BytesIO(data)).size  # the header only
    except Image.DecompressionBombError:
        # Pillow refuses headers over twice its own pixel limit before the size can be read
        raise ApiError(422, "image_too_large", f"{field}: more pixels than {s.max_image_pixels} allowed; downscale "
                                               "it first", field=field) from None
    except Exception:
        raise ApiError(422, "invalid_image", f"{field}: not a readable image (PNG, JPEG, ...)", field=field) from None
    if w * h > s.max_image_pixels:
        raise ApiError(422, "image_too_large", f"{field}: {w}x{h} = {w * h} pixels > {s.max_image_pixels} allowed; "
                                               "downscale it first", field=field)
    return data


def _check_prompt(prompt: str, s: ServeConfig, field: str = "prompt") -> None:
    if len(prompt) > s.max_prompt_chars:
        raise ApiError(422, "prompt_too_long", f"{field} has {len(prompt)} characters > {s.max_prompt_chars} "
                                               "allowed; shorten it", field=field)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, "invalid_prompt", f"{field} is not valid Unicode text ({e.reason} at index {e.start}); "
                                              "send UTF-8", field=field) from None


async def _await(response):
    return await response


def _job_id(job_id: str) -> str:
    if not HEX_ID.match(job_id):
        raise ApiError(404, "unknown_job", f"no job {job_id!r}; job ids are 32 hex characters from POST /v1/refine")
    return job_id


def _public_state(state: dict, cancel_requested: bool) -> dict:
    keys = ("id", "state", "step", "total_steps", "loss", "psnr_batch", "psnr_train", "psnr_test", "seconds",
            "attempts", "resumed_from_step", "resumes", "created", "started", "finished", "error", "updated")
    out = {k: state[k] for k in keys if k in state}
    total = max(int(state.get("total_steps") or 1), 1)
    out["progress"] = round(min(int(state.get("step") or 0) / total, 1.0), 4)
    if cancel_requested and state["state"] in ACTIVE:
        out["cancel_requested"] = True
    jid = state["id"]
    out["links"] = {"self": f"/v1/jobs/{jid}", "result": f"/v1/jobs/{jid}/result", "cancel": f"/v1/jobs/{jid}"}
    return out


def replica_counts(app_name: str = APP_NAME) -> dict[str, dict[str, int]]:
    """{deployment: {replica state: count}} of the running application (from the Serve controller)."""
    status = serve.status()
    application = status.applications.get(app_name)
    if application is None:
        return {}
    return {name: {str(k): int(v) for k, v in d.replica_states.items()} for name, d in application.deployments.items()}


# ---------------------------------------------------------------------------------------------------------------
# The ingress
# ---------------------------------------------------------------------------------------------------------------
@serve.deployment(name="API")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator, renderer, refiner, cfg: dict, ckpt: str, storage_options: dict | None = None):
        self.generator, self.renderer, self.refiner = generator, renderer, refiner
        self.cfg = P2NConfig.from_dict(cfg)
        self.s = self.cfg.serve
        torch.set_num_threads(self.s.torch_threads)
        # The middleware reads the module's settings; this class may arrive pickled by value, with a copy.
        importlib.import_module("serve.app")._RUNTIME.update(max_body_bytes=self.s.max_body_bytes,
                                                            api_key_env=self.s.api_key_env)
        self.store = ArtefactStore(self.s.store, storage_options)
        self.jobs = JobStore(self.store)
        self.ckpt = ckpt
        self.app_name = serve.get_replica_context().app_name  # "p2n", or "default" under `serve run MODULE:app`
        self._info: dict | None = None
        self._driving: dict[str, asyncio.Task] = {}
        self._supervisor: asyncio.Task | None = None

    # ---- helpers --------------------------------------------------------------------------------------------
    async def check_health(self) -> None:
        self._ensure_supervisor()  # Serve calls this every health_check_period_s: it restarts the job supervisor

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _model(self, timeout: float | None = None) -> dict:
        if self._info is None:
            self._info = await self._call(lambda: self.generator.info.remote(), "Generator", timeout)
        return self._info

    async def _call(self, make, what: str, timeout: float | None = None):
        """Await a deployment call; once more if its replica died (generation is idempotent); 503/504 after."""
        deadline = time.monotonic() + (timeout or self.s.request_timeout_s)
        for attempt in range(2):
            try:
                out = await asyncio.wait_for(_await(make()), max(deadline - time.monotonic(), 0.1))
            except REPLICA_DIED as e:
                log.warning("%s replica died during a request (%s); %s", what, type(e).__name__,
                            "retrying" if attempt == 0 else "giving up")
                if attempt == 1:
                    raise ApiError(503, "unavailable", f"the {what} replica serving this request died; retry in a "
                                                       "few seconds") from None
            except asyncio.TimeoutError:
                raise ApiError(504, "timeout", f"{what} did not answer within {timeout or self.s.request_timeout_s:.0f}"
                                               " s; the service is overloaded, retry later") from None
            else:
                if isinstance(out, dict) and "p2n_error" in out:
                    raise ApiError(422, out["p2n_error"]["code"], out["p2n_error"]["message"])
                return out

    async def _deliver(self, name: str, data: bytes | list[bytes], media_type: str, delivery: str, gid: str,
                       **meta: Any) -> dict:
        out: dict[str, Any] = {"media_type": media_type, **meta}
        if delivery == "url":
            if isinstance(data, list):
                stem, ext = name.rsplit(".", 1)
                names = [f"{stem}-{i:02d}.{ext}" for i in range(len(data))]
                for n, d in zip(names, data):
                    await asyncio.to_thread(self.store.write, f"artefacts/{gid}/{n}", d)
                out["urls"] = [f"/v1/artefacts/{gid}/{n}" for n in names]
            else:
                await asyncio.to_thread(self.store.write, f"artefacts/{gid}/{name}", data)
                out["url"] = f"/v1/artefacts/{gid}/{name}"
                out["bytes"] = len(data)
        else:
            out["encoding"] = "base64"
            out["data"] = ([base64.b64encode(d).decode() for d in data] if isinstance(data, list)
                           else base64.b64encode(data).decode())
        return out

    # ---- pages and info -------------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        self._ensure_supervisor()
        return HTMLResponse((STATIC / "index.html").read_text())

    @api.get("/healthz", summary="liveness and model readiness")
    async def healthz(self) -> JSONResponse:
        self._ensure_supervisor()
        try:
            info = await self._model(timeout=10)
        except ApiError as e:
            return _error(503, "unavailable", f"the Generator is not ready: {e.detail}")
        return JSONResponse({"status": "ok", "version": API_VERSION, "layout_hash": info["model"]["layout_hash"]})

    @api.get("/v1/models", summary="the loaded checkpoint: encoders, field config, limits")
    async def models(self) -> dict:
        from p2n.refine import GUIDANCES

        info = await self._model()
        s = self.s
        return {"checkpoint": self.ckpt, **info["model"], "supports_images": info["supports_images"],
                "outputs": list(Output.__args__), "guidances": sorted(GUIDANCES),
                "limits": {"max_prompt_chars": s.max_prompt_chars, "max_image_bytes": s.max_image_bytes,
                           "max_image_pixels": s.max_image_pixels, "max_body_bytes": s.max_body_bytes,
                           "max_views": s.max_views, "max_render_size": s.max_render_size,
                           "max_refine_steps": s.max_refine_steps}}

    @api.get("/v1/status", summary="replicas per deployment and active jobs")
    async def status(self) -> dict:
        return {"deployments": await asyncio.to_thread(replica_counts, self.app_name),
                "active_jobs": len(await asyncio.to_thread(self.jobs.active_ids)), "time": time.time()}

    # ---- generation -----------------------------------------------------------------------------------------
    @api.post("/v1/generate", summary="a prompt or an image → NeRF parameters, views, turntable, mesh")
    async def generate(self, body: GenerateRequest) -> dict:
        t0 = time.perf_counter()
        s = self.s
        if body.views > s.max_views:
            raise ApiError(422, "invalid_request", f"views: {body.views} > {s.max_views} allowed", field="views")
        if body.size > s.max_render_size:
            raise ApiError(422, "invalid_request", f"size: {body.size} > {s.max_render_size} allowed", field="size")
        info = await self._model()
        if body.prompt is not None:
            _check_prompt(body.prompt, s)
            g = await self._call(lambda: self.generator.from_prompt.remote(body.prompt), "Generator")
            source = {"kind": "text", "prompt": body.prompt}
        else:
            data = _b64_image(body.image, s)
            g = await self._call(lambda: self.generator.from_image.remote(data), "Generator")
            source = {"kind": "image", "bytes": len(data)}
        t_gen = time.perf_counter()
        gid = uuid.uuid4().hex
        timings: dict[str, Any] = {"generate_ms": round(g["generate_ms"], 3), "batch_size": g["batch_size"],
                                   "generator_call_ms": round((t_gen - t0) * 1000, 3)}
        outputs: dict[str, Any] = {}

        async def deliver(name: str, data: bytes | list[bytes], media_type: str, **meta: Any) -> dict:
            return await self._deliver(name, data, media_type, body.delivery, gid, **meta)

        if "params" in body.outputs:
            from p2n.config import FieldConfig
            from p2n.nerf.params import params_to_bytes

            field = FieldConfig(**info["cfg"]["field"])
            meta = {"prompt": body.prompt} if body.prompt is not None else {"source": "image"}
            blob = params_to_bytes(torch.from_numpy(g["params"]), field, {**meta, "checkpoint": self.ckpt})
            outputs["params"] = await deliver("params.safetensors", blob, "application/octet-stream",
                                              format="safetensors", num_params=int(g["params"].size),
                                              layout_hash=info["model"]["layout_hash"])
        if "latent" in body.outputs:
            outputs["latent"] = [round(float(x), 6) for x in g["latent"]]
        kinds = [k for k in ("views", "turntable", "mesh") if k in body.outputs]
        if kinds:
            opts = body.model_dump(include={"views", "frames", "size", "mesh_resolution", "mesh_format"})
            t_r = time.perf_counter()
            results = await asyncio.gather(
                *[self._call(lambda k=k: self.renderer.render.remote(k, g["params"], info["cfg"], opts), "Renderer")
                  for k in kinds], return_exceptions=True)
            timings["render_ms"] = {}
            for kind, res in zip(kinds, results):
                if isinstance(res, ApiError):  # this artefact failed (e.g. no surface to mesh); the rest stand
                    outputs[kind] = {"error": {"code": res.code, "message": res.detail}}
                    continue
                if isinstance(res, BaseException):
                    raise res
                timings["render_ms"][kind] = round(res["render_ms"], 1)
                if kind == "views":
                    outputs[kind] = await deliver("view.png", res["data"], "image/png", count=len(res["data"]),
                                                  size=body.size)
                elif kind == "turntable":
                    outputs[kind] = await deliver("turntable.gif", res["data"], "image/gif", frames=res["frames"],
                                                  size=body.size)
                else:
                    fmt = body.mesh_format
                    outputs[kind] = await deliver(f"mesh.{fmt}", res["data"], MEDIA_TYPES[f".{fmt}"], format=fmt,
                                                  vertices=res["vertices"], faces=res["faces"])
            timings["render_wall_ms"] = round((time.perf_counter() - t_r) * 1000, 1)
        timings["total_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return {"id": gid, "input": source, "outputs": outputs, "timings": timings,
                "model": {"checkpoint": self.ckpt, "layout_hash": info["model"]["layout_hash"]}}

    @api.get("/v1/artefacts/{gid}/{name}", summary="download an artefact of a generate request (delivery=url)")
    async def artefact(self, gid: str, name: str) -> Response:
        if not HEX_ID.match(gid) or not FILE_NAME.match(name):
            raise ApiError(404, "not_found", f"no artefact {gid}/{name}")
        try:
            data = await asyncio.to_thread(self.store.read, f"artefacts/{gid}/{name}")
        except FileNotFoundError:
            raise ApiError(404, "not_found", f"no artefact {gid}/{name}") from None
        return Response(data, media_type=MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream"))

    # ---- refinement jobs ------------------------------------------------------------------------------------
    @api.post("/v1/refine", status_code=202, summary="start a refinement job; returns its id at once")
    async def refine(self, body: RefineRequest) -> dict:
        from p2n.refine import GUIDANCES

        self._ensure_supervisor()
        s = self.s
        if body.guidance not in GUIDANCES:
            raise ApiError(422, "unknown_guidance", f"guidance {body.guidance!r} is not one of "
                                                    f"{', '.join(sorted(GUIDANCES))}", field="guidance")
        if body.steps > s.max_refine_steps:
            raise ApiError(422, "invalid_request", f"steps: {body.steps} > {s.max_refine_steps} allowed",
                           field="steps")
        if body.guidance == "multiview" and not body.scene:
            raise ApiError(422, "invalid_request", "the multiview guidance fits posed views: give 'scene' (a "
                                                   "procedural caption or id, e.g. 'a red cube')", field="scene")
        info = await self._model()
        cfg = P2NConfig.from_dict(info["cfg"])
        prompt = body.prompt
        for name in ("prompt", "scene"):
            if getattr(body, name) is not None:
                _check_prompt(getattr(body, name), s, name)
        if body.scene:
            from p2n.scenes.catalogue import resolve_scene

            spec = await asyncio.to_thread(resolve_scene, body.scene, cfg.scene)
            prompt = prompt or spec.captions[0]
        image = _b64_image(body.image, s) if body.image is not None else None
        files: dict[str, bytes] = {}
        if image is not None:
            files["image"] = image
        if body.init != "scratch":
            from p2n.nerf.params import params_to_bytes

            if body.init == "mean":
                p = await self._call(lambda: self.generator.mean_params.remote(), "Generator")
            elif prompt is not None:
                p = (await self._call(lambda: self.generator.from_prompt.remote(prompt), "Generator"))["params"]
            elif image is not None:
                p = (await self._call(lambda: self.generator.from_image.remote(image), "Generator"))["params"]
            else:
                raise ApiError(422, "invalid_request", "init 'generated' needs a prompt, an image or a scene",
                               field="init")
            files["init.safetensors"] = params_to_bytes(torch.from_numpy(np.asarray(p)), cfg.field,
                                                        {"init": body.init})
        job_cfg = cfg.override([f"refine.steps={body.steps}", f"refine.seed={body.seed}",
                                f"refine.checkpoint_every={s.job_checkpoint_every}",
                                f"refine.num_threads={s.torch_threads}"])
        job_id = self.jobs.new_id()
        request = body.model_dump(exclude={"image"}) | {"image": image is not None}
        state = await asyncio.to_thread(self.jobs.create, job_id, request, job_cfg.to_dict(), files)
        self._drive(job_id)
        return _public_state(state, False)

    def _drive(self, job_id: str) -> None:
        if job_id not in self._driving:
            self._driving[job_id] = asyncio.get_running_loop().create_task(self._run_to_end(job_id))

    async def _run_to_end(self, job_id: str) -> None:
        """Dispatch a job to a Refiner replica, and again (it resumes from its checkpoint) when that one dies."""
        try:
            for attempt in range(self.s.max_job_attempts + 1):
                try:
                    await self.refiner.run.remote(job_id)
                    return
                except REPLICA_DIED as e:
                    log.warning("job %s: its Refiner replica died (%s); dispatching it again", job_id,
                                type(e).__name__)
                    await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))
                except Exception as e:  # the runner itself broke: record it, keep serving
                    log.exception("job %s: dispatch failed", job_id)
                    error = {"code": "internal", "message": f"{type(e).__name__}: {e}"}
                    await asyncio.to_thread(self.jobs.update, job_id, state="failed", finished=time.time(),
                                            owner=None, error=error)
                    return
        finally:
            self._driving.pop(job_id, None)

    async def _supervise(self) -> None:
        """Find jobs nobody heartbeats (their replica and its dispatcher died) and dispatch them again."""
        period = max(self.s.job_lease_s / 2, 0.5)
        while True:
            try:
                for job_id in await asyncio.to_thread(self.jobs.active_ids):
                    if job_id in self._driving:
                        continue
                    state = await asyncio.to_thread(self.jobs.state, job_id)
                    if state and state["state"] in ACTIVE and lease_expired(state, self.s.job_lease_s):
                        log.warning("job %s: no heartbeat for %.0f s; dispatching it again", job_id,
                                    self.s.job_lease_s)
                        self._drive(job_id)
            except Exception:
                log.exception("job supervisor pass failed")
            await asyncio.sleep(period)

    async def _state(self, job_id: str) -> dict:
        state = await asyncio.to_thread(self.jobs.state, _job_id(job_id))
        if state is None:
            raise ApiError(404, "unknown_job", f"no job {job_id}")
        return state

    @api.get("/v1/jobs/{job_id}", summary="state and progress of a refinement job")
    async def job(self, job_id: str) -> dict:
        state = await self._state(job_id)
        cancel = state["state"] in ACTIVE and await asyncio.to_thread(self.jobs.cancel_requested, job_id)
        return _public_state(state, cancel)

    @api.get("/v1/jobs/{job_id}/result", summary="the result of a finished job")
    async def job_result(self, job_id: str) -> dict:
        state = await self._state(job_id)
        if state["state"] != "succeeded":
            extra = {"state": state["state"]} | ({"job_error": state["error"]} if state.get("error") else {})
            raise ApiError(409, "not_ready" if state["state"] in ACTIVE else f"job_{state['state']}",
                           f"job {job_id} is {state['state']}"
                           + ("; poll GET /v1/jobs/{id} until it succeeds" if state["state"] in ACTIVE else ""),
                           **extra)
        result = dict(state["result"])
        files = {name: f"/v1/jobs/{job_id}/files/{name}" for name in result.pop("files")}
        return {"id": job_id, "state": "succeeded", **result, "attempts": state.get("attempts"),
                "resumed_from_step": state.get("resumed_from_step"), "files": files}

    @api.get("/v1/jobs/{job_id}/files/{name}", summary="a result file of a finished job")
    async def job_file(self, job_id: str, name: str) -> Response:
        state = await self._state(job_id)
        if name not in RESULT_FILES or state["state"] != "succeeded":
            raise ApiError(404, "not_found", f"job {job_id} has no file {name!r}"
                                             + ("" if state["state"] == "succeeded" else f" (it is {state['state']})"))
        data = await asyncio.to_thread(self.jobs.read_file, job_id, f"result/{name}")
        return Response(data, media_type=MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream"))

    @api.delete("/v1/jobs/{job_id}", summary="cancel a job (it stops at its next step)")
    async def cancel(self, job_id: str) -> JSONResponse:
        state = await self._state(job_id)
        if state["state"] in TERMINAL:
            raise ApiError(409, f"job_{state['state']}", f"job {job_id} already {state['state']}; nothing to cancel",
                           state=state["state"])
        await asyncio.to_thread(self.jobs.request_cancel, job_id)
        if state["state"] == "queued":
            state = await asyncio.to_thread(self.jobs.update, job_id, state="cancelled", finished=time.time())
            return JSONResponse(_public_state(state, False), status_code=200)
        return JSONResponse(_public_state(state, True), status_code=202)


# ---------------------------------------------------------------------------------------------------------------
# Builder and local runners
# ---------------------------------------------------------------------------------------------------------------
def build_app(args: AppArgs | dict) -> serve.Application:
    """The Serve application for ``args`` (``serve run serve.app:app ckpt=...``, serve/config.yaml ``args``)."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    ckpt = a.ckpt
    if "://" not in ckpt:
        if not os.path.exists(ckpt):
            raise P2NError(f"ckpt {ckpt}: no such folder; pass a generator checkpoint (the --out of `p2n train align`)")
        ckpt = os.path.abspath(ckpt)
    cfg = a.p2n_config()
    s = cfg.serve
    if "://" not in s.store:
        s.store = os.path.abspath(s.store)  # replicas may run in another working directory
    cfg_dict = cfg.to_dict()
    gpus = _gpus_present()
    generator = GeneratorDeployment.options(**deployment_options("Generator", s.generator, s, gpus)).bind(
        ckpt, cfg_dict, a.storage_options, a.device)
    renderer = RendererDeployment.options(**deployment_options("Renderer", s.renderer, s, gpus)).bind(s.torch_threads)
    refiner = RefinerDeployment.options(**deployment_options("Refiner", s.refiner, s, gpus)).bind(
        s.store, a.storage_options, {"torch_threads": s.torch_threads, "job_lease_s": s.job_lease_s,
                                     "max_job_attempts": s.max_job_attempts})
    return Ingress.options(**deployment_options("API", s.ingress, s, gpus, use_gpu=False)).bind(
        generator, renderer, refiner, cfg_dict, ckpt, a.storage_options)


app = build_app  # `serve run serve.app:app ckpt=DIR` and serve/config.yaml (import_path: serve.app:app)


_STARTED_RAY = False


def start(ckpt: str, host: str | None = None, port: int | None = None, *, config: str | None = None,
          overrides: list[str] | None = None, store: str | None = None, storage_options: dict | None = None,
          address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
          log_level: str = "INFO") -> str:
    """Start Ray (unless connected already), Serve on ``host:port`` and the application; returns its URL.

    ``log_level`` is the replicas' (INFO logs every request; WARNING keeps errors only).
    """
    global _STARTED_RAY
    import ray

    args = AppArgs(ckpt=ckpt, config=config, overrides=list(overrides or []), store=store,
                   storage_options=storage_options)
    s = args.p2n_config().serve
    host, port = host or s.host, int(port if port is not None else s.port)
    if not ray.is_initialized():
        for attempt in range(3):
            try:
                ray.init(address=address, num_cpus=num_cpus, include_dashboard=dashboard, logging_level="WARNING",
                         log_to_driver=True)
                break
            except Exception as e:  # Ray gives a raylet only 30 s to register; a loaded machine can miss that
                if "timed out during startup" not in str(e) or attempt == 2:
                    raise
                ray.shutdown()
        _STARTED_RAY = True
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False,
              logging_config={"log_level": log_level})
    url = f"http://{host}:{port}"
    _wait_healthy(url, timeout=120)
    return url


def _wait_healthy(url: str, timeout: float) -> None:
    import httpx

    key = os.environ.get(ServeConfig().api_key_env)
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10, headers={"X-API-Key": key} if key else None)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise RuntimeError(f"{url}/healthz not ready after {timeout:.0f} s: {last}")


def stop() -> None:
    """Shut the application and Serve down (and Ray, when :func:`start` started it)."""
    global _STARTED_RAY
    import ray

    if ray.is_initialized():
        serve.shutdown()
        if _STARTED_RAY:
            ray.shutdown()
            _STARTED_RAY = False


def demo_request(ckpt: str, port: int = 8000, prompt: str = "a red cube", outputs: tuple[str, ...] = ("params",
                 "turntable"), **start_kwargs: Any) -> dict:
    """Start Serve on 127.0.0.1:``port`` with ``ckpt``, make one generate request over HTTP, stop; the timings."""
    import httpx

    t0 = time.perf_counter()
    url = start(ckpt, "127.0.0.1", port, **start_kwargs)
    startup_s = time.perf_counter() - t0
    try:
        key = os.environ.get(ServeConfig().api_key_env)
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "outputs": list(outputs)}, timeout=120,
                       headers={"X-API-Key": key} if key else None)
        request_ms = (time.perf_counter() - t) * 1000
        body = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"POST /v1/generate answered {r.status_code}: {body}")
        return {"url": url, "status": r.status_code, "startup_s": round(startup_s, 2),
                "request_ms": round(request_ms, 1), "timings": body["timings"], "outputs": sorted(body["outputs"]),
                "layout_hash": body["model"]["layout_hash"]}
    finally:
        stop()


def serve_forever(ckpt: str, host: str = "127.0.0.1", port: int = 8000, **start_kwargs: Any) -> None:
    """``p2n serve``: start, print the URL, block until Ctrl-C, shut down."""
    import signal
    import threading

    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        url = start(ckpt, host, port, **start_kwargs)
        print(f"p2n serving {ckpt} at {url}  (web page {url}/, API docs {url}/docs); Ctrl-C stops", flush=True)
        print(json.dumps({"url": url, "ckpt": ckpt, "docs": f"{url}/docs"}), flush=True)
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("p2n serve: shutting down", flush=True)
        stop()
