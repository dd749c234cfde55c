"""Every csrc/*.cu compiles with nvcc for sm_90 (CI has nvcc but no GPU, so this is the only
check the CUDA kernels get there). Files are globbed at test time, so ops added later are
covered; two nvcc jobs run in parallel into a temporary directory.

Flags mirror setup.py's build (torch's COMMON_NVCC_FLAGS, which forbid implicit half/bf16
conversions, and --use_fast_math). CPU wheels of torch ship the c10/cuda headers but not the
CMake-generated c10/cuda/impl/cuda_cmake_macros.h; a stand-in is supplied when it is missing.
"""
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = 2
PER_FILE_TIMEOUT_S = 600


def _include_dirs(tmp: Path) -> list[str]:
    from torch.utils import cpp_extension

    dirs = [str(ROOT / "csrc" / "include"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(d) / macros).exists() for d in dirs):
        shim = tmp / "shim"
        (shim / macros).parent.mkdir(parents=True)
        (shim / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(shim))
    return dirs


def _nvcc_command(nvcc: str, source: Path, obj: Path, includes: list[str]) -> list[str]:
    from torch.utils import cpp_extension

    return [nvcc, "-std=c++17", "-arch=sm_90", "-c", str(source), "-o", str(obj), "--use_fast_math",
            "-DTORCH_EXTENSION_NAME=_C", *cpp_extension.COMMON_NVCC_FLAGS, *(f"-I{d}" for d in includes)]


def _compile(cmd: list[str]) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PER_FILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {PER_FILE_TIMEOUT_S} s", time.monotonic() - start
    errors = "\n".join(line for line in proc.stderr.splitlines() if "error" in line.lower())
    return proc.returncode, errors or proc.stderr[-4000:], time.monotonic() - start


def test_every_cu_file_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert sources, "no csrc/*.cu files found"
    includes = _include_dirs(tmp_path)
    cmds = [_nvcc_command(nvcc, s, tmp_path / f"{s.stem}.o", includes) for s in sources]
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        results = list(pool.map(_compile, cmds))
    for source, (rc, _, secs) in zip(sources, results):
        print(f"{source.name}: rc={rc} {secs:.1f}s")
    failed = [f"{s.name} (rc={rc}):\n{err}" for s, (rc, err, _) in zip(sources, results) if rc != 0]
    assert not failed, "nvcc failed:\n\n" + "\n\n".join(failed)
