"""Train stage 2, the aligner from prompt embeddings (text or image) to the VAE latent, with Ray Train + DeepSpeed.

    ray job submit --working-dir . -- python ray_jobs/train_align.py --data s3://bucket/ds --vae s3://bucket/vae \
        --out s3://bucket/align --workers 8 --gpus-per-worker 1 --resume
    p2n train align --data /tmp/ds --vae /tmp/vae --out /tmp/align --workers 2          # same, on an embedded local Ray

Flags: --data URI --out URI --vae URI [--workers W] [--gpus-per-worker G] [--resume] [--config FILE.yaml]
[--storage-options JSON] [--address ADDR] [--set SECTION.KEY=VALUE ...]. Everything is in ray_jobs/_train_common.py
(Ray glue) and p2n/train (the training itself).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo importable (see _common.ensure_repo_on_path)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_jobs._train_common import main, train  # noqa: E402


def train_align(**kwargs):
    """``ray_jobs._train_common.train(stage="align", ...)``."""
    return train("align", **kwargs)


if __name__ == "__main__":
    sys.exit(main("align"))
