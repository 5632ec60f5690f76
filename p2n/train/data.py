"""Training data in worker memory: dataset rows -> object records, each worker's share of the objects, seeded
batch sampling, and the few collectives the stages need (sums across workers; no-ops without torch.distributed).

A worker keeps its objects in memory (parameters, captions, the stored views) and draws every batch from a
generator seeded by ``(seed, rank, step)``: a run resumed from a checkpoint at step s draws exactly the batches
the uninterrupted run would have, and every worker runs the same number of steps whatever its share's size.

Does not own: reading the dataset (``p2n.data``; Ray Data in ``ray_jobs/``) or the models.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from p2n.cameras import Views
from p2n.config import FieldConfig
from p2n.errors import P2NError


class TrainError(P2NError):
    """Training cannot start or go on: no objects, mismatched layouts, a bad setting."""


@dataclass
class ObjectRecord:
    object_id: str
    split: str
    params: Tensor  # [P] float32
    captions: list[str] = field(default_factory=list)
    heldout_captions: list[str] = field(default_factory=list)  # paraphrases never trained on: evaluation only
    views: Views | None = None  # the object's stored (held-out) RGBA views


def records_from_rows(rows: Iterable[Mapping[str, Any]], expected_field: FieldConfig | None = None,
                      with_views: bool = True) -> tuple[list[ObjectRecord], FieldConfig | None]:
    """Decode dataset rows (dicts with the ``p2n.data`` columns, status "ok") into records.

    Every row must share one parameter layout (``expected_field`` when given, else the first row's)."""
    from p2n.data import row_params, row_views

    out: list[ObjectRecord] = []
    cfg = expected_field
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        flat, fcfg = row_params(row, cfg)
        cfg = cfg or fcfg
        out.append(ObjectRecord(
            object_id=str(row["object_id"]), split=str(row["split"]), params=flat.float().contiguous(),
            captions=[str(c) for c in (row.get("captions") or [])],
            heldout_captions=[str(c) for c in (row.get("heldout_captions") or [])],
            views=row_views(row) if with_views else None,
        ))
    out.sort(key=lambda r: r.object_id)
    return out, cfg


def shard_ids(object_ids: Iterable[str], rank: int, world: int) -> list[str]:
    """This worker's share of the objects: every ``world``-th id of the sorted list, starting at ``rank``.
    Balanced (shares differ by at most one), deterministic, and nothing is dropped."""
    return sorted(object_ids)[rank::world]


def step_generator(seed: int, rank: int, step: int, salt: str = "") -> torch.Generator:
    """The generator for one (worker, step): the same batches on resume as in an uninterrupted run."""
    key = zlib.crc32(f"{seed}/{rank}/{step}/{salt}".encode())
    return torch.Generator().manual_seed(key)


def sample_indices(n: int, k: int, gen: torch.Generator) -> Tensor:
    """``k`` indices into ``n`` items: without replacement when ``k <= n`` (a random subset), else every item
    ``k // n`` times plus a random subset for the rest."""
    if n <= 0:
        raise TrainError("this worker holds no training objects; use fewer workers than objects")
    reps, rest = divmod(k, n)
    parts = [torch.randperm(n, generator=gen) for _ in range(reps)]
    parts.append(torch.randperm(n, generator=gen)[:rest])
    return torch.cat(parts)


# ---- collectives (no-ops in a single process) ------------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(x: Tensor, device: torch.device | None = None) -> Tensor:
    """Sum of ``x`` over workers (float64 sums stay float64); returned on x's device."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    dev = device if device is not None else x.device
    y = x.to(dev).clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def global_stats(params: Tensor, std_floor: float, device: torch.device | None = None) -> tuple[Tensor, Tensor, int]:
    """Per-coordinate mean and floored std over every worker's parameter vectors ``[n_local, P]``.

    Exact (float64 sums and sums of squares, reduced across workers): the same statistics whatever the split."""
    x = params.double()
    n = all_sum(torch.tensor([float(x.shape[0])], dtype=torch.float64), device)
    s = all_sum(x.sum(0), device)
    s2 = all_sum((x * x).sum(0), device)
    count = int(n.item())
    if count == 0:
        raise TrainError("no training objects at all: the dataset has no rows with split 'train' and status 'ok'")
    mean = s / count
    var = (s2 / count - mean * mean).clamp(min=0)
    return mean.float(), var.sqrt().clamp(min=std_floor).float(), count
