"""Suite-wide settings: one torch thread per process (Ray workers and subprocesses share 2 cores with pytest,
and many small ops on 2 threads mostly wait on each other), seeded RNGs, and no network beyond 127.0.0.1.

Also the tiny fitted dataset and VAE that the training, latent and job-submission tests share: built once per
session under pytest's session temp dir (``p2n.train.testing``). ``tests/data`` has its own, smaller ``tiny_cfg``.
And for the Ray Data jobs' tests: a moto S3 server on 127.0.0.1 with the AWS environment pointed at it, and one
local Ray per test module (``NEEDS_S3 = True`` in a module starts the S3 server first).
"""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)

from p2n.train.testing import build_tiny_dataset, tiny_config, train_tiny_vae  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_cfg) -> Path:
    # The catalogue's first 11 singles: 9 training objects and 2 held-out colour x shape combinations
    # (cyan sphere, brown cone), so evaluation has both splits.
    return build_tiny_dataset(tmp_path_factory.getbasetemp() / "p2n-tiny-dataset", 11, tiny_cfg)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory, tiny_dataset, tiny_cfg) -> Path:
    return train_tiny_vae(tiny_dataset, tmp_path_factory.getbasetemp() / "p2n-tiny-vae", tiny_cfg)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (random port) and the AWS_* environment pointed at it, for this module.

    Set before Ray starts (``ray_session`` depends on this where both are used) so Ray's workers inherit it.
    Yields the endpoint URL."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="p2n-test")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="module")
def ray_session(request):
    """One local Ray (2 CPUs, no dashboard) for a test module; starts after the module's S3 env if it has one."""
    ray = pytest.importorskip("ray")
    if getattr(request.module, "NEEDS_S3", False):
        request.getfixturevalue("s3_server")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
