"""The fused C++ kernels under AddressSanitizer: any out-of-bounds read or write of the
kernels (scratch buffers, row pointers, padding, tails) aborts the run.

Builds the extension a second time with -fsanitize=address (-O0: GCC's ASan misses some
vector stores when optimising) into a temporary directory and runs asan_kernels.py with the
ASan runtime preloaded. Checked to fail on a one-float-short scratch buffer.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _libasan():
    cxx = shutil.which("g++")
    if cxx is None:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _missing():
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "Linux x86-64 only"
    if shutil.which("cmake") is None:
        return "cmake not found"
    if _libasan() is None:
        return "g++ with libasan not found"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 not installed (pip install -e '.[dev]')"
    return None


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_kernels_under_address_sanitizer(tmp_path):
    import pybind11

    build = tmp_path / "build"
    flags = "-O0 -g -fsanitize=address -fno-omit-frame-pointer"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Debug",
                 f"-DCMAKE_CXX_FLAGS={flags}", "-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address",
                 f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    module = next(build.glob("_C*.so"))
    env = dict(os.environ, LD_PRELOAD=_libasan(), ASAN_OPTIONS="detect_leaks=0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("asan_kernels.py")), str(module)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("ok"), \
        f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}"
    assert int(run.stdout.split()[1]) >= 16   # cases actually run (at least the portable build's)
