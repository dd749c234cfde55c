"""Build kvplug, and its CUDA extension kvplug._C when a CUDA toolchain is present.

Our Triton kernels live in the top-level folder triton_kernels/ but are installed as
kvplug._triton: Triton ships a real package named `triton_kernels` that vLLM probes
for, and ours must never shadow it.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def cuda_extensions():
    if os.environ.get("KVPLUG_NO_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        print("kvplug: no CUDA torch or no nvcc, building without kvplug._C")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    archs = os.environ.get("KVPLUG_CUDA_ARCHS", "80;90")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")]
    ext = CUDAExtension(
        name="kvplug._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc/include")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
packages = find_packages(include=["kvplug", "kvplug.*"]) + ["kvplug._triton"]

setup(
    packages=packages,
    package_dir={"kvplug._triton": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
