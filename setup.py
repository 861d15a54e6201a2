"""Builds refusal_kernels._C: the op schemas, the C++ CPU kernels and, when a CUDA toolkit
and a CUDA build of torch are present, the CUDA kernels.

Environment:
  REFUSAL_KERNELS_CUDA=0     never build the CUDA kernels (=1: fail if they cannot be built)
  CUDA_HOME                  toolkit root; found from the nvcc on PATH when unset
  TORCH_CUDA_ARCH_LIST       defaults to "8.0;8.9;9.0+PTX"
  REFUSAL_KERNELS_NATIVE=0   build the CPU kernels without AVX2/FMA/F16C even if the build
                             machine has them
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup


def _toolkit_root_from_nvcc() -> str | None:
    """The CUDA root for the nvcc on PATH, seeing through wrapper scripts that exec the real one."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+)/bin/nvcc\b", head)
        return match.group(1).decode() if match else None
    return os.path.dirname(os.path.dirname(nvcc))


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    root = _toolkit_root_from_nvcc()
    if root:
        os.environ["CUDA_HOME"] = root
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    setting = os.environ.get("REFUSAL_KERNELS_CUDA", "auto")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if setting == "0":
        return False
    if setting == "1" and not possible:
        sys.exit("REFUSAL_KERNELS_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
    return possible


def _cpu_flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if os.environ.get("REFUSAL_KERNELS_NATIVE", "1") == "0":
        return flags
    try:
        with open("/proc/cpuinfo") as f:
            cpu = f.read()
    except OSError:
        return flags
    if all(f" {flag}" in cpu for flag in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")):
        # at::vec selects its AVX512 specializations from these macros.
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
        flags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        if " avx512_bf16" in cpu:  # native fp32 -> bf16 rounding (vec_ops.h)
            flags += ["-mavx512bf16"]
    elif all(f" {flag}" in cpu for flag in ("avx2", "fma", "f16c")):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = _cpu_flags()
    if not _want_cuda():
        return CppExtension(
            "refusal_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    # pip's CUDA wheels keep headers (cuda_runtime.h, cub, ...) inside site-packages.
    include_dirs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__path__[0]), "nvidia", "cu*", "include")))
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "refusal_kernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        define_macros=[("REFUSAL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)},
)
