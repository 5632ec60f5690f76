"""The application builder without Ray: serve/config.yaml's arguments build the app, unknown arguments are refused,
deployment options come from the config's ``serve:`` section and switch to GPUs when the cluster has them, and
p2n itself stays free of Ray imports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]


def test_config_yaml_args_build_the_application(tiny_ckpt):
    from ray.serve import Application

    from serve.app import AppArgs, build_app

    doc = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app_cfg,) = doc["applications"]
    assert app_cfg["import_path"] == "serve.app:app" and app_cfg["name"] == "p2n"
    args = AppArgs.model_validate({**app_cfg["args"], "ckpt": str(tiny_ckpt)})
    assert isinstance(build_app(args), Application)
    assert isinstance(build_app({"ckpt": str(tiny_ckpt), "overrides": "serve.generator.max_replicas=3"}),
                      Application)  # `serve run serve.app:app ckpt=... overrides=...` passes strings


def test_builder_refuses_unknown_args_and_missing_checkpoints(tmp_path, tiny_ckpt):
    from pydantic import ValidationError

    from p2n.errors import P2NError
    from serve.app import build_app

    with pytest.raises(ValidationError, match="ckpt_path"):
        build_app({"ckpt": str(tiny_ckpt), "ckpt_path": "x"})
    with pytest.raises(P2NError, match="no such folder"):
        build_app({"ckpt": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="unknown config key"):
        build_app({"ckpt": str(tiny_ckpt), "overrides": ["serve.generator.max_replica=3"]})


def test_deployment_options_follow_the_serve_section():
    from p2n.config import P2NConfig
    from serve.app import deployment_options

    cfg = P2NConfig().override(["serve.generator.max_replicas=6", "serve.generator.target_ongoing_requests=3",
                                "serve.refiner.min_replicas=0", "serve.gpus_when_present=0.25"])
    s = cfg.serve
    gen = deployment_options("Generator", s.generator, s, gpus=False)
    assert gen["autoscaling_config"]["max_replicas"] == 6 and gen["autoscaling_config"]["target_ongoing_requests"] == 3
    assert gen["ray_actor_options"] == {"num_cpus": s.generator.num_cpus, "num_gpus": 0.0}
    assert deployment_options("Generator", s.generator, s, gpus=True)["ray_actor_options"]["num_gpus"] == 0.25
    assert deployment_options("API", s.ingress, s, gpus=True, use_gpu=False)["ray_actor_options"]["num_gpus"] == 0
    assert deployment_options("Refiner", s.refiner, s, gpus=False)["autoscaling_config"]["min_replicas"] == 0
    pinned = P2NConfig().override(["serve.renderer.num_gpus=1"]).serve
    assert deployment_options("Renderer", pinned.renderer, pinned, gpus=False)["ray_actor_options"]["num_gpus"] == 1


def test_p2n_never_imports_ray():
    pattern = re.compile(r"^\s*(import ray|from ray)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "p2n").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
