"""The typed configuration shared by the CLI, the Ray jobs and Serve.

Every setting lives here exactly once, as a dataclass field with a default that runs on a 2-core CPU. A config
loads from and dumps to YAML (`P2NConfig.from_yaml`, `.to_yaml`) and takes dotted overrides from the command
line (`--set fit.steps=200`). Modules receive the sub-config they need, never loose keyword arguments.

Does not own: how the values are used.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class SceneConfig:
    """Procedural catalogue and the camera rigs its views are rendered from."""

    seed: int = 0
    image_size: int = 64  # square views, pixels
    num_train_views: int = 48
    num_test_views: int = 8
    camera_radius: float = 4.0
    fov_deg: float = 40.0
    heldout_fraction: float = 0.2  # share of colour x shape combinations never used for training


@dataclass(frozen=True)
class FieldConfig:
    """The hash-grid NeRF: its layout is what every parameter vector in a dataset shares."""

    implementation: Literal["auto", "tcnn", "torch"] = "auto"
    num_levels: int = 8
    features_per_level: int = 2
    log2_hashmap_size: int = 14
    base_resolution: int = 16
    max_resolution: int = 128
    hidden_dim: int = 64
    geo_feat_dim: int = 15
    color_hidden_dim: int = 64
    aabb_scale: float = 1.5  # the field covers the cube [-aabb_scale, aabb_scale]^3

    @property
    def per_level_scale(self) -> float:
        if self.num_levels == 1:
            return 1.0
        return float((self.max_resolution / self.base_resolution) ** (1.0 / (self.num_levels - 1)))

    def layout_hash(self) -> str:
        """Fingerprint of everything that changes the parameter layout (not the implementation)."""
        d = {k: v for k, v in asdict(self).items() if k != "implementation"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RenderConfig:
    num_samples: int = 64  # samples per ray before occupancy skipping
    occupancy_resolution: int = 32
    occupancy_threshold: float = 0.01  # density * step below which a cell counts as empty
    chunk_rays: int = 8192  # rays rendered at once when no gradient is needed; bounds memory at any size
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class FitConfig:
    """Fitting one object from the shared initialization."""

    init_seed: int = 0  # the shared, fixed initialization: every object in a dataset uses the same one
    steps: int = 400
    rays_per_step: int = 2048
    lr: float = 1e-2
    lr_final_factor: float = 0.1
    target_psnr: float | None = 32.0  # stop early once the training batch PSNR passes this (None: never)
    empty_weight: float = 0.1  # penalty on optical thickness where the silhouettes prove space empty
    occupancy_update_every: int = 16
    occupancy_decay: float = 0.8
    num_threads: int | None = None  # torch intra-op threads (None: torch's default)
    device: str = "auto"  # "auto": cuda when available (tcnn hash grid if importable), else cpu
    seed: int = 0  # ray sampling order


@dataclass
class DatasetConfig:
    """Building the per-object NeRF dataset (``p2n dataset build``, ``ray_jobs/build_dataset.py``).

    ``--num-objects``, ``--workers`` and ``--gpus-per-worker`` on the command line override the first three.
    """

    num_objects: int = 16  # procedural objects when no --catalogue is given
    workers: int = 2  # fitting actors (one object at a time each)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: 1, or less on a small machine so Ray Data keeps a CPU slice free
    torch_threads: int | None = None  # per actor; None: the actor's whole CPUs (1 for a fractional CPU)
    objects_per_shard: int = 1  # rows per parquet file: also what a killed worker can lose and refit
    # Batches handed to an actor at once: with 2 the next object is already there when a fit ends. With 1 the
    # actor waits for the driver's scheduler between objects, 0.15-0.2 s when every core is fitting (measured:
    # 24 objects on 2 workers, fit span 102.9 -> 98.7 s).
    batches_in_flight: int = 2
    include_pairs: bool = True  # procedural catalogue: two-object compositions too
    # CPU actors bind their threads to cores no other p2n worker on the node holds (ray_jobs/cpu_slots.py): fewer
    # cache-cold moves between cores while Ray's own processes run beside them.
    pin_cpus: bool = True
    max_retries: int = 3  # restarts of a dead fitting actor and retries of its batch



@dataclass
class BatchConfig:
    """Offline batch generation (``p2n generate-batch``, ``ray_jobs/generate_batch.py``): many prompts through a pool
    of generator actors into parquet shards. ``--workers``, ``--gpus-per-worker``, ``--batch-size`` and ``--views``
    override the first four."""

    workers: int = 1  # generator actors, each holding the checkpoint once
    gpus_per_worker: float = 0.0
    batch_size: int = 32  # prompts per forward pass, and rows per shard (what a killed worker can lose)
    views: int = 4  # rendered views per prompt, stored as one PNG row in the shard; 0: parameters only
    view_size: int | None = None  # pixels; None: scene.image_size
    cpus_per_worker: float | None = None  # None: 1, or less on a small machine (as dataset.cpus_per_worker)
    torch_threads: int | None = None  # per actor; None: its whole CPUs
    max_retries: int = 3  # restarts of a dead actor and retries of its batch


@dataclass
class VAEConfig:
    """Stage 1: the VAE over flattened NeRF parameter vectors (``p2n/latent``) and its training hyper-parameters.

    The flat vector is cut per layer / per hash-grid level into tokens of at most ``chunk_size`` values. Each token
    has its own linear map (``chunk_size`` <-> ``head_dim``), so the size-dependent part of the model is
    ``2 * num_params * head_dim`` weights; a transformer of width ``model_dim`` mixes the tokens.
    """

    latent_dim: int = 64
    chunk_size: int = 1024  # parameter values per token (the last token of a layer/level is padded)
    head_dim: int = 32  # per-token rank of the chunk encoders/decoders: lower it for million-parameter fields
    model_dim: int = 128  # transformer width
    depth: int = 0  # transformer layers in the encoder and again in the decoder (0: chunked linear + token MLP)
    heads: int = 4
    kl_weight: float = 1e-4  # beta: KL (mean over latent dims) relative to the reconstruction MSE (mean over params)
    std_floor: float = 1e-3  # per-coordinate std below this counts as this when normalising parameters
    render_weight: float = 0.0  # weight of the decoded-render MSE (0: parameter reconstruction only)
    render_rays: int = 256  # rays per object per step for the render loss
    steps: int = 300
    batch_size: int = 8  # objects per step per worker
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0


@dataclass
class AlignConfig:
    """Stage 2: the transformer that maps a prompt embedding (text or image) to the VAE latent (``p2n/align``).

    Encoder specs are ``p2n.align.build_encoder`` specs. CPU demo: ``minilm`` text (paraphrase-aware, offline) and
    ``tiny-clip`` images; production: ``openclip:ViT-B-32:/path/to/weights`` for both (one model is built once when
    both specs are equal). ``image_encoder: null`` trains on text only.
    """

    text_encoder: str = "minilm"
    image_encoder: str | None = "tiny-clip"
    image_fraction: float = 0.25  # share of each training batch that are image prompts (the objects' views)
    num_tokens: int = 4  # the embedding becomes this many input tokens (one input projection per modality)
    model_dim: int = 128
    depth: int = 2
    heads: int = 4
    dropout: float = 0.0
    render_weight: float = 0.0  # weight of the decoded-render MSE (0: latent regression only)
    render_rays: int = 256
    # Training noise on text embeddings, in units of the captions' spread (align_stage.embedding_spread). Measured
    # on the demo data (minilm): unseen paraphrases 23.5 dB without it, 27.4 dB at 1.25; the objects' fits 27.7.
    text_noise: float = 1.25
    steps: int = 2000
    batch_size: int = 32  # prompts per step per worker
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    """How both stages run on Ray Train (``ray_jobs/train_vae.py``, ``train_align.py``, ``p2n train``).

    ``--workers`` and ``--gpus-per-worker`` on the command line override the first two. ``backend: ddp`` is the
    documented plain-DDP fallback for machines where DeepSpeed cannot run; it is never chosen silently.
    """

    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # None: 1 on GPU workers, 0.5 on CPU so Ray Data keeps CPU to read with
    torch_threads: int | None = None  # per worker; None: Ray's default (the worker's CPUs, at least 1)
    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-2 (optimizer state and gradients are partitioned from 1 / 2)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 with GPUs, fp32 on CPU
    seed: int = 0
    checkpoint_every: int = 200  # steps between checkpoints (and always at the end)
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    log_every: int = 10  # steps between metric records (metrics.jsonl, loss.png)
    eval_every: int = 0  # steps between decoded-render evaluations (0: only at the end)
    eval_objects: int = 6  # objects per split rendered for evaluation (bounds its cost)
    eval_views: int = 4  # views per object rendered for evaluation


@dataclass
class GuidanceConfig:
    """Settings of every refinement guidance (``p2n.refine.guidance``); each one reads the fields it needs."""

    # Local folder of a diffusers model (``save_pretrained`` layout, one subfolder per component), or "tiny" for
    # a random tiny model of the same layout built on the fly (tests, demos). Nothing is downloaded at run time.
    model_path: str | None = None
    # Classifier-free guidance scale; None takes the guidance's own default (sds 100, zero123 3, clip 1).
    # For clip, which has no CFG, it is the weight of the loss.
    guidance_scale: float | None = None
    # Diffusion timesteps are sampled uniformly in [min_step_ratio, max_step_ratio] * T.
    min_step_ratio: float = 0.02
    max_step_ratio: float = 0.98
    # When set, the upper end anneals linearly from max_step_ratio (step 0) to this (last step): large noise
    # early shapes the object, small noise late refines detail.
    max_step_ratio_end: float | None = None
    # The diffusion model's input size in pixels (SD 2.1-base 512, zero123 256, tiny 64); renders are resized to
    # it. None takes the model's own, unet.sample_size * the VAE's downscale. (clip uses its encoder's own size.)
    image_size: int | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float32 on CPU, bf16/fp16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    clip_model: str = "tiny-clip"  # encoder spec handed to p2n.align.encoders.build_encoder
    clip_augment: bool = False  # clip: random crops of the render, a cheap guard against adversarial pixels
    seed: int = 0  # timesteps, noise and augmentations come from one generator seeded here


@dataclass
class RefineConfig:
    """Refining one NeRF from an initialization with a guidance (``p2n refine``, ``p2n.refine``).

    ``multiview`` trains on random pixels of posed views (``rays_per_step``), like ``fit``; the image guidances
    (``sds``, ``zero123``, ``clip``) render ``views_per_step`` whole ``image_size`` views from random cameras on
    a sphere of ``camera_radius`` in an elevation band. Held-out PSNR is measured every ``eval_every`` steps
    whenever the object has ground-truth views.
    """

    steps: int = 300
    lr: float = 1e-2
    lr_final_factor: float = 0.1  # exponential decay to lr * this at the last step
    warmup_steps: int = 0  # linear lr warm-up from 0
    rays_per_step: int = 1024  # multiview: pixels per step
    empty_weight: float = 0.1  # multiview: penalty on optical thickness where the silhouettes prove space empty
    views_per_step: int = 1  # image guidances: views rendered per step
    image_size: int = 32  # image guidances: side of each rendered view in pixels
    camera_radius: float | None = None  # image guidances; None: scene.camera_radius
    min_elevation_deg: float = -10.0
    max_elevation_deg: float = 60.0
    fov_deg: float | None = None  # None: scene.fov_deg
    # Image guidances' background: render.background, or a random colour per view.
    background: Literal["render", "random"] = "render"
    ref_elevation_deg: float = 0.0  # zero123 with an image prompt: the elevation its reference view is taken at
    occupancy_update_every: int = 16
    occupancy_decay: float = 0.8
    eval_every: int = 10  # steps between held-out PSNR evaluations (0: only at the start and the end)
    eval_views: int | None = 4  # held-out views rendered per evaluation (None: all of them)
    checkpoint_every: int = 50  # steps between checkpoints in OUT/ckpt (0: none); a run always ends with one
    seed: int = 0  # cameras, pixels, backgrounds and sample jitter
    device: str = "auto"
    num_threads: int | None = None
    guidance: GuidanceConfig = dc_field(default_factory=GuidanceConfig)


@dataclass
class ReplicaConfig:
    """One Serve deployment's replicas: autoscaling bounds, load target and resources per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None  # None: min_replicas
    target_ongoing_requests: float = 2.0  # autoscaling keeps ongoing requests per replica near this
    max_ongoing_requests: int = 16  # a replica takes no more at once; the rest wait in the router
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 15.0  # window the load is averaged over (> metrics_interval_s)
    metrics_interval_s: float = 5.0  # how often replicas report their load to the autoscaler
    num_cpus: float = 0.25  # fractional so every deployment fits on a 2-core machine
    num_gpus: float | None = None  # None: gpus_when_present if the cluster has GPUs, else 0


@dataclass
class ServeConfig:
    """The HTTP service (``serve/app.py``, ``p2n serve``): replicas, limits, API key, where jobs and files live.

    ``store`` is a folder or an fsspec URI (``s3://bucket/p2n-serve``) that outlives every replica: refinement jobs
    keep their state and checkpoints there (a job whose replica dies resumes elsewhere), and artefacts delivered
    as URLs are read back from it. On a multi-node cluster it must be shared (object store or network folder).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    store: str = "outputs/serve"
    api_key_env: str = "P2N_API_KEY"  # when this environment variable is set, requests must carry its value
    max_body_bytes: int = 12 * 1024 * 1024  # larger request bodies get 413
    max_prompt_chars: int = 1000
    max_image_bytes: int = 8 * 1024 * 1024  # decoded, after base64
    max_image_pixels: int = 2048 * 2048
    max_views: int = 16
    max_render_size: int = 256
    max_refine_steps: int = 2000
    max_batch_size: int = 16  # prompts (or images) per forward pass on a Generator replica
    batch_wait_timeout_s: float = 0.005  # how long a batch waits to fill
    request_timeout_s: float = 120.0  # one generate request, end to end (504 past it)
    torch_threads: int = 1  # per replica
    health_check_period_s: float = 2.0
    job_checkpoint_every: int = 10  # refinement steps between checkpoints on the store
    job_lease_s: float = 20.0  # a queued/running job without a heartbeat for this long is dispatched again
    max_job_attempts: int = 5  # dispatches of one job before it is marked failed
    gpus_when_present: float = 0.5  # GPUs per Generator/Renderer/Refiner replica when num_gpus is None
    ingress: ReplicaConfig = dc_field(default_factory=lambda: ReplicaConfig(max_replicas=2, num_cpus=0.1,
                                                                             max_ongoing_requests=256,
                                                                             target_ongoing_requests=32))
    generator: ReplicaConfig = dc_field(default_factory=ReplicaConfig)
    renderer: ReplicaConfig = dc_field(default_factory=lambda: ReplicaConfig(target_ongoing_requests=1,
                                                                              max_ongoing_requests=4))
    refiner: ReplicaConfig = dc_field(default_factory=lambda: ReplicaConfig(target_ongoing_requests=1,
                                                                             max_ongoing_requests=2))


def resolve_device(name: str = "auto") -> str:
    """"auto" → "cuda" when a GPU is visible, else "cpu"; anything else is passed through."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class P2NConfig:
    scene: SceneConfig = dc_field(default_factory=SceneConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    fit: FitConfig = dc_field(default_factory=FitConfig)
    dataset: DatasetConfig = dc_field(default_factory=DatasetConfig)
    batch: BatchConfig = dc_field(default_factory=BatchConfig)
    vae: VAEConfig = dc_field(default_factory=VAEConfig)
    align: AlignConfig = dc_field(default_factory=AlignConfig)
    train: TrainConfig = dc_field(default_factory=TrainConfig)
    refine: RefineConfig = dc_field(default_factory=RefineConfig)
    serve: ServeConfig = dc_field(default_factory=ServeConfig)

    # ---- YAML and overrides -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "P2NConfig":
        return _build(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> "P2NConfig":
        text = str(path_or_text)
        looks_like_path = isinstance(path_or_text, Path) or ("\n" not in text and len(text) < 1024)
        if looks_like_path and (Path(text).suffix in (".yaml", ".yml") or Path(text).exists()):
            text = Path(text).read_text()
        data = yaml.safe_load(text)
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"config must be a YAML mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def override(self, assignments: list[str]) -> "P2NConfig":
        """Apply ``section.key=value`` strings (values parsed as YAML) and return a new config."""
        d = self.to_dict()
        for a in assignments:
            if "=" not in a:
                raise ValueError(f"override {a!r} is not of the form section.key=value")
            key, raw = a.split("=", 1)
            node = d
            parts = key.strip().split(".")
            for p in parts[:-1]:
                if p not in node or not isinstance(node[p], dict):
                    raise ValueError(f"unknown config section {p!r} in {a!r}; sections: {sorted(d)}")
                node = node[p]
            if parts[-1] not in node:
                raise ValueError(f"unknown config key {key!r}; known keys here: {sorted(node)}")
            value = yaml.safe_load(raw)
            if isinstance(value, str):
                try:  # YAML 1.1 reads "1e30" as a string; a number is what anyone typing it means
                    value = float(value) if any(c in value for c in ".eE") else int(value)
                except ValueError:
                    pass
            node[parts[-1]] = value
        return P2NConfig.from_dict(d)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"config section {where or 'root'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'root'!r}; known: {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        t = hints[name]
        if is_dataclass(t):
            kwargs[name] = _build(t, value, f"{where}.{name}".strip("."))
        elif typing.get_origin(t) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> P2NConfig:
    cfg = P2NConfig() if path is None else P2NConfig.from_yaml(path)
    return cfg.override(overrides or [])


