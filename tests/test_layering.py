"""The layering rule: only kvplug.connector imports vLLM; our Triton folder never shadows
the real `triton_kernels` package."""
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import kvplug

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_but_connector_imports_vllm():
    mods = [m.name for m in pkgutil.walk_packages(kvplug.__path__, "kvplug.") if ".connector" not in m.name]
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import importlib\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_our_triton_folder_installs_as_kvplug_triton_only():
    # Run from the repository root, where the folder is on sys.path: the import must either
    # find Triton's real package or fail, never hand vLLM our kernels under that name.
    code = "import triton_kernels, pathlib; print(pathlib.Path(triton_kernels.__file__).resolve())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode == 0:
        assert not out.stdout.strip().startswith(str(ROOT / "triton_kernels")), out.stdout
    else:
        assert "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr, out.stderr[-500:]
    ours = importlib.import_module("kvplug._triton")
    assert Path(ours.__file__).resolve().parent == ROOT / "triton_kernels"
