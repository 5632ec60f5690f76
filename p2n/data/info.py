"""What ``p2n dataset info`` reports: counts, the PSNR distribution, failures, and a contact sheet that puts a few
objects' stored held-out views next to renders of their stored parameters (so a broken row shows at a glance).

Does not own: reading (``reader.py``) or rendering (``p2n.nerf.render``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from p2n.config import P2NConfig
from p2n.data.manifest import psnr_stats
from p2n.data.reader import open_dataset, row_params, row_views
from p2n.data.schema import STATUS_OK, SUMMARY_COLUMNS


def dataset_info(uri: str, sheet: str | Path | None = "./dataset_sheet.png",
                 storage_options: dict[str, Any] | str | None = None, sheet_objects: int = 4,
                 sheet_views: int = 4) -> dict[str, Any]:
    ds = open_dataset(uri, storage_options)
    summary = ds.to_pandas(columns=SUMMARY_COLUMNS).to_dict("records")
    ok = [r for r in summary if r["status"] == STATUS_OK]
    failed = sorted((r for r in summary if r["status"] != STATUS_OK), key=lambda r: r["object_id"])
    splits: dict[str, int] = {}
    for r in ok:
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    record: dict[str, Any] = {
        "uri": uri,
        "complete": ds.manifest.get("complete"),
        "counts": {"total": len(summary), "ok": len(ok), "failed": len(failed), **splits},
        "psnr_test": psnr_stats(r["psnr_test"] for r in ok),
        "seconds_per_object": psnr_stats(r["seconds"] for r in summary),
        "layout_hash": ds.manifest.get("layout_hash"),
        "num_params": ds.manifest.get("num_params"),
        "shards": len(ds.shards),
        "failures": [{"object_id": r["object_id"], "error": r["error"]} for r in failed],
    }
    record["sheet"], record["sheet_objects"] = None, []  # nothing to draw without ok rows
    if sheet and ok and sheet_objects > 0:
        record["sheet"], record["sheet_objects"] = _contact_sheet(ds, sheet, sheet_objects, sheet_views)
    return record


def _contact_sheet(ds, path: str | Path, k: int, v: int) -> tuple[str, list[dict[str, Any]]]:
    """Rows of truth / render pairs for the first ``k`` ok objects; returns the path and what is on it."""
    from p2n.nerf.field import NeRFField
    from p2n.nerf.render import composite, psnr, render_image
    from p2n.viz import image_grid

    cfg = ds.config or P2NConfig()
    rows, labels, objects = [], [], []
    for n, row in enumerate(ds.rows()):
        if n >= k:
            break
        flat, field_cfg = row_params(row)
        views = row_views(row)[list(range(min(v, len(row["views_png"]))))]
        rgb, _ = render_image(NeRFField(field_cfg), flat, views.cameras, cfg.render)
        truth = composite(views.images, cfg.render.background)
        rows += [list(truth), list(rgb)]
        labels += [f"{n} truth", f"{n} nerf"]
        objects.append({"row": n, "object_id": row["object_id"], "psnr_test": row["psnr_test"],
                        "psnr_sheet_views": float(psnr(rgb, truth).mean())})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 96 // max(rows[0][0].shape[0], 1))
    image_grid(rows, labels=labels, scale=scale).save(path)
    return str(path.resolve()), objects
