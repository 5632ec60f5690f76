"""The per-object NeRF dataset: its row schema and layout (``schema.py``), reading it (``reader.py``), fitting
one object into a row (``build.py``), and writing shards, resuming and the manifest (``output.py``).

Plain PyTorch + fsspec (+ pyarrow for parquet): no Ray here. The Ray Data pipeline that shards the fitting across
workers is ``ray_jobs/build_dataset.py``; it only calls these functions.
"""

from p2n.data.errors import DataError
from p2n.data.reader import DatasetReader, open_dataset, row_params, row_views
from p2n.data.schema import COLUMNS

__all__ = ["COLUMNS", "DataError", "DatasetReader", "open_dataset", "row_params", "row_views"]
