"""Build and install bns_pipe.

The C++ ops in ``csrc/`` are compiled with ``torch.utils.cpp_extension``; the CUDA kernels in
``csrc/cuda/`` only when the installed torch has CUDA. A failed or skipped build leaves the
package usable: every op has a pure-PyTorch fallback. Install with
``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""

from __future__ import annotations

import os
from glob import glob

from setuptools import find_packages, setup


def _notice(reason: str) -> None:
    print(f"bns_pipe: C++ extension not built ({reason}); the pure-PyTorch fallback will be used")


def extension_build() -> tuple[list, dict]:
    """The extension modules and the build_ext command, or nothing when they cannot be built."""
    if os.environ.get("BNS_PIPE_NO_EXT") == "1":
        _notice("BNS_PIPE_NO_EXT=1")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        _notice(f"torch not importable: {exc}")
        return [], {}

    sources = sorted(glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "bns_pipe._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "bns_pipe._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )

    class OptionalBuildExt(BuildExtension):
        """Build the extension, or print one notice and go on without it."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # any compiler or toolchain failure
                _notice(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

setup(
    name="bns_pipe",
    version="0.1.0",
    description="Distributed full-graph GCN training with boundary-node sampling and pipelining",
    packages=find_packages(include=["bns_pipe", "bns_pipe.*"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.1", "torch-geometric", "pymetis", "ogb", "tqdm", "matplotlib"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["bns-pipe = bns_pipe.cli:main"]},
)
