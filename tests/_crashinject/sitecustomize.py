"""Test-only: a real native crash (SIGSEGV) when a process reads one particular slide.

Put this folder first on PYTHONPATH and set WSIFLOW_TEST_CRASH_LEVEL0="WIDTHxHEIGHT": any
read from a slide whose level 0 has that size dereferences NULL in C (``ctypes.string_at(0)``),
as a crash inside a decoding library would. Keeps the suite's network guard installed.
"""

from __future__ import annotations

import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "_netguard", "sitecustomize.py"))

_TARGET = os.environ.get("WSIFLOW_TEST_CRASH_LEVEL0")
if _TARGET:
    import ctypes

    from pipeline import _backend

    width, height = (int(v) for v in _TARGET.split("x"))

    def _crashing(read):
        def read_region(self, x, y, level, w, h):
            if tuple(self.level_dimensions[0]) == (width, height):
                ctypes.string_at(0)  # SIGSEGV in native code
            return read(self, x, y, level, w, h)

        return read_region

    for _cls in (_backend._OpenSlideBackend, _backend._TiffSlideBackend):
        _cls.read_region = _crashing(_cls.read_region)
