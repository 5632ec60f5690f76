"""Keeping Hugging Face libraries off the network while p2n loads weights, and finding their cache.

huggingface_hub reads HF_HUB_OFFLINE and its cache location once, at import; p2n may be imported long after
(or by a notebook that already imported transformers), so both are resolved here at call time instead.
Does not own: which files an encoder needs (`_openclip.py`, `_minilm.py`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Switch huggingface_hub (and transformers, which asks it) to offline mode for the duration.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so the env var alone is not enough in a running process;
    the module constant is patched too. Both are restored afterwards.
    """
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # no hub client: nothing could download anyway
        hf_constants = None
    saved_flag = getattr(hf_constants, "HF_HUB_OFFLINE", None)
    if hf_constants is not None:
        hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, resolved from the environment now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.environ["HUGGINGFACE_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(xdg, "huggingface", "hub")
