"""Make `import torchvision` work beside a CPU torch whose matching torchvision wheel is a CUDA build.

The trap: on this stack PyPI resolves torchvision 0.28.0 (a CUDA build) next to torch 2.13.0+cpu. Its compiled
ops library `_C.so` cannot load, which torchvision tolerates, but `torchvision/_meta_registrations.py` then calls
`torch.library.register_fake("torchvision::nms")` unconditionally and the import dies with
`RuntimeError: operator torchvision::nms does not exist`. open_clip (its transforms) and transformers (hence
sentence-transformers) both import torchvision, so neither imports either.

The fix, applied only when that exact failure happens: define the two operator *schemas* the meta registrations
need (`torchvision::nms`, `torchvision::qnms`) in a `torch.library` FRAGMENT, then import again. The image
transforms we use are pure torch and work; `torchvision.ops.nms` still raises torchvision's own "Couldn't load
custom C++ ops" error, which p2n never calls. On a normal install the first import succeeds and nothing is defined.

Does not own: any image preprocessing (that is `p2n/align/encoders.py`), or choosing package versions.
"""

from __future__ import annotations

import sys
import threading

import torch

# Kept alive for the life of the process: a torch.library.Library deregisters its definitions when collected.
_LIB: torch.library.Library | None = None
_LOCK = threading.Lock()
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def shim_applied() -> bool:
    """True when this process needed (and got) the nms/qnms schema definitions."""
    return _LIB is not None


def _is_missing_nms_error(err: BaseException) -> bool:
    msg = str(err)
    return "torchvision::" in msg and "does not exist" in msg


def _purge_torchvision_modules() -> None:
    # A failed package import leaves some submodules behind (torchvision.extension, ...); drop them all so the
    # retry runs torchvision's import from the start, in its normal order.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision_importable() -> bool:
    """Import torchvision, defining the missing nms/qnms schemas first if (and only if) that is what breaks it.

    Returns True when the shim was applied in this process (now or earlier), False when torchvision imported on
    its own or is not installed at all (callers that need it then fail with the plain ModuleNotFoundError).
    Call it right before importing open_clip, transformers or sentence_transformers.
    """
    global _LIB
    with _LOCK:
        if "torchvision" in sys.modules:
            return _LIB is not None
        try:
            import torchvision  # noqa: F401
            return False
        except ModuleNotFoundError:
            return False
        except RuntimeError as e:
            if not _is_missing_nms_error(e):
                raise
            first_error = e

        _purge_torchvision_modules()
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op, schema in _SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, op):
                lib.define(schema)
        _LIB = lib
        try:
            import torchvision  # noqa: F401,F811
        except Exception as e:  # the schemas were not the only problem; say what was tried
            raise RuntimeError(
                f"torchvision fails to import beside torch {torch.__version__} ({first_error}); defining the "
                f"torchvision::nms/qnms schemas did not help ({type(e).__name__}: {e}). Install the torchvision "
                f"built for this torch, e.g. `pip install torchvision --index-url "
                f"https://download.pytorch.org/whl/cpu -c <constraint pinning torch=={torch.__version__}>`."
            ) from e
        return True
