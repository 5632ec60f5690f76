"""Training both stages in plain PyTorch: data in worker memory (``data.py``), the DeepSpeed / DDP backend
(``engine.py``), losses (``losses.py``), metrics and run files (``metrics.py``), the shared loop with checkpoints
(``loop.py``) and the two stages (``vae_stage.py``, ``align_stage.py``).

Ray never appears here: ``ray_jobs/train_vae.py`` and ``ray_jobs/train_align.py`` read the dataset with Ray Data,
start the workers with Ray Train and call these classes; the same classes run in one process without Ray
(``train.backend: ddp`` without a process group trains a bare module).

Does not own: the models (``p2n.latent``, ``p2n.align.aligner``) or the dataset format (``p2n.data``).
"""

from p2n.train.align_stage import AlignStage
from p2n.train.data import ObjectRecord, TrainError, records_from_rows, shard_ids
from p2n.train.engine import Engine, lr_at, make_engine
from p2n.train.loop import Stage, run
from p2n.train.vae_stage import VAEStage

__all__ = ["AlignStage", "Engine", "ObjectRecord", "Stage", "TrainError", "VAEStage", "lr_at", "make_engine",
           "records_from_rows", "run", "shard_ids"]
