"""Build script: the Python packages plus the optional C++ extension trp_kernels._C.

The extension is built by CMake (CMakeLists.txt at the root). Environment switches:

  TRP_NO_CPP=1         build no extension at all: a pure-Python install that uses the
                       "torch" backend on CPU.
  TRP_CPP_REQUIRED=1   a failing C++ build fails the install. Without it a failure prints a
                       warning and the install goes on without _C (trp_kernels.cpp then warns
                       at import time, which is where a user actually sees it: pip hides a
                       build's output unless run with -v).
  TRP_BUILD_TYPE       CMake build type, Release by default (Debug with --debug).
  CMAKE_ARGS           extra CMake arguments, e.g. "-DTRP_NATIVE=ON" (split like a shell).
  CMAKE_GENERATOR      overrides the generator; otherwise Ninja when available.
  CMAKE_BUILD_PARALLEL_LEVEL  overrides the build's job count (default: all CPUs).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

VERSION = "0.1.0"
ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class CMakeExtension(Extension):
    """An extension whose sources CMake knows; setuptools compiles nothing itself."""

    def __init__(self, name: str, source_dir: Path = ROOT, required: bool = False) -> None:
        # optional=True makes setuptools carry on (with a warning) when this extension's
        # build raises CompileError, and skip copying a .so that was never produced.
        super().__init__(name, sources=[], optional=not required)
        self.source_dir = Path(source_dir).resolve()


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        try:
            self._build_with_cmake(ext)
        except Exception as exc:  # noqa: BLE001 - any failure means "no _C", reported below
            self._report_failure(ext, exc)
            raise CompileError(f"building {ext.name} failed: {exc}") from exc

    def _build_with_cmake(self, ext: CMakeExtension) -> None:
        import pybind11  # a build requirement (pyproject.toml), so present under isolation

        # Where setuptools expects the module: build_lib/trp_kernels for a wheel; an editable
        # install builds there too and then copies it into the source tree.
        ext_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = os.environ.get("TRP_BUILD_TYPE") or ("Debug" if self.debug else "Release")
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        cmake = _find_cmake()
        configure = [
            cmake,
            "-S",
            str(ext.source_dir),
            "-B",
            str(build_temp),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            # Multi-config generators (Visual Studio, Xcode) append the config name unless
            # the per-config variable is set as well.
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{build_type.upper()}={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTRP_KERNELS_VERSION={VERSION}",
        ]
        if "CMAKE_GENERATOR" not in os.environ:
            ninja = _find_ninja()
            if ninja is not None:
                configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        build = [cmake, "--build", str(build_temp), "--config", build_type]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build += ["-j", str(os.cpu_count() or 1)]

        for step, cmd in (("configure", configure), ("build", build)):
            print("trp setup.py:", shlex.join(cmd), flush=True)
            result = subprocess.run(cmd)
            if result.returncode != 0:
                raise RuntimeError(
                    f"CMake {step} step exited with status {result.returncode} (its output "
                    "is above; pip shows it with -v)"
                )

        built = Path(self.get_ext_fullpath(ext.name))
        if not built.is_file():
            raise RuntimeError(f"CMake finished but {built} was not produced")

    def _report_failure(self, ext: CMakeExtension, exc: BaseException) -> None:
        line = "!" * 78
        if ext.optional:
            consequence = (
                "The install continues WITHOUT the C++ extension; trp_kernels falls back to "
                "the 'torch' backend and warns at import. Set TRP_CPP_REQUIRED=1 to make this "
                "an error, or TRP_NO_CPP=1 to skip the C++ build on purpose."
            )
        else:
            consequence = "TRP_CPP_REQUIRED=1 is set, so the install fails."
        print(
            f"\n{line}\nWARNING: building {ext.name} with CMake failed:\n  {exc}\n"
            f"{consequence}\n{line}\n",
            file=sys.stderr,
            flush=True,
        )


def _find_cmake() -> str:
    # The `cmake` wheel from the build requirements first: the system one may be older.
    try:
        import cmake

        candidate = Path(cmake.CMAKE_BIN_DIR) / ("cmake.exe" if os.name == "nt" else "cmake")
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("cmake")
    if found is None:
        raise RuntimeError("cmake not found: pip install cmake, or use TRP_NO_CPP=1")
    return found


def _find_ninja() -> str | None:
    try:
        import ninja

        candidate = Path(ninja.BIN_DIR) / ("ninja.exe" if os.name == "nt" else "ninja")
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("ninja")


def _ext_modules() -> list[Extension]:
    if _env_flag("TRP_NO_CPP"):
        return []
    return [CMakeExtension("trp_kernels._C", required=_env_flag("TRP_CPP_REQUIRED"))]


def _long_description() -> str:
    readme = ROOT / "README.md"
    return readme.read_text(encoding="utf-8") if readme.is_file() else ""


setup(
    name="trp",
    version=VERSION,
    description="Trained Rank Pruning: low-rank CNNs that are faster in wall-clock time",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["trp", "trp.*", "trp_kernels", "trp_kernels.*"]),
    # the Triton kernels' table of natively clean autotune configs (trp_kernels/triton/native.py)
    package_data={"trp_kernels.triton": ["clean_configs.json"]},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "scikit-learn>=1.2",
        # no triton: the CPU paths never import it, and CUDA builds of torch bring their own
    ],
    extras_require={
        # trp.deploy / python -m trp deploy: the ONNX exporter, and ONNX Runtime to check the file
        "deploy": ["onnx>=1.16", "onnxscript>=0.1", "onnxruntime>=1.17"],
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "onnx>=1.16",
            "onnxscript>=0.1",
            "onnxruntime>=1.17",
            "openvino>=2024.0",  # a peer in the benchmark suite (python -m trp bench)
            "matplotlib>=3.6",
            "pybind11>=2.12",  # the AddressSanitizer build in tests/trp_kernels/test_cpp_asan.py
            # the Triton kernels' tests run them under its interpreter on CPU
            "triton>=3.0; platform_system=='Linux' and platform_machine=='x86_64'",
        ]
    },
    entry_points={"console_scripts": ["trp = trp.cli:main"]},
    zip_safe=False,
)
