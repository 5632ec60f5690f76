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
    rays_per_step: int = 4096
    lr: float = 1e-2
    lr_final_factor: float = 0.1
    target_psnr: float | None = 32.0  # stop early once the training batch PSNR passes this (None: never)
    occupancy_update_every: int = 16
    occupancy_decay: float = 0.8
    num_threads: int | None = None  # torch intra-op threads (None: torch's default)
    seed: int = 0  # ray sampling order


@dataclass
class P2NConfig:
    scene: SceneConfig = dc_field(default_factory=SceneConfig)
    field: FieldConfig = dc_field(default_factory=FieldConfig)
    render: RenderConfig = dc_field(default_factory=RenderConfig)
    fit: FitConfig = dc_field(default_factory=FitConfig)

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
        p = Path(path_or_text)
        text = p.read_text() if p.suffix in (".yaml", ".yml") or p.exists() else str(path_or_text)
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
            node[parts[-1]] = yaml.safe_load(raw)
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


