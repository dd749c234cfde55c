"""The layering rule: only kvplug.connector imports vLLM, only kvplug.sglang imports SGLang; our
Triton folder never shadows the real `triton_kernels` package."""
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import kvplug

ROOT = Path(__file__).resolve().parents[1]


def _modules(skip: tuple[str, ...]) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(kvplug.__path__, "kvplug.")
            if not any(f".{s}" in m.name for s in skip)]


def _import_blocking(mods: list[str], blocked: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked)
        + "import importlib\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_nothing_but_connector_imports_vllm():
    # kvplug.sglang imports SGLang, which may be absent here; with it installed it is checked too.
    skip = ("connector",) if importlib.util.find_spec("sglang") else ("connector", "sglang")
    out = _import_blocking(_modules(skip), ["vllm"])
    assert out.returncode == 0, out.stderr[-2000:]


def test_nothing_but_kvplug_sglang_imports_sglang():
    out = _import_blocking(_modules(("connector", "sglang")), ["vllm", "sglang"])
    assert out.returncode == 0, out.stderr[-2000:]
    # kvplug.sglang's own helper modules (all but backend) do not need SGLang either.
    helpers = [m for m in _modules(("connector",)) if m.startswith("kvplug.sglang") and m != "kvplug.sglang.backend"]
    out = _import_blocking(helpers, ["vllm", "sglang"])
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_connector_does_not_import_sglang():
    out = _import_blocking([m for m in _modules(("sglang",)) if ".connector" in m], ["sglang"])
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
