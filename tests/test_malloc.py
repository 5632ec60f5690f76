"""p2n.malloc: glibc keeps large freed blocks after keep_freed_memory()."""

import ctypes
import ctypes.util
import sys

import pytest
import torch

from p2n.malloc import keep_freed_memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_stay_in_the_heap():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = _Mallinfo2
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    before = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
    x = torch.empty(8 << 20, dtype=torch.uint8)  # 8 MiB: above glibc's default mmap threshold
    during = libc.mallinfo2()
    assert during.hblkhd - before < (8 << 20), "an 8 MiB tensor was still served by mmap"
    del x
    after = libc.mallinfo2()
    assert after.arena >= during.arena - (1 << 20), "the heap was trimmed right after a free"
