"""tools/gpu_check.py cannot rot: its dry run (every CPU-runnable part) runs here, and the parts
that only a GPU run reaches (junit counting, reading a GPU benchmark against the targets, the
fallback build command) run on synthetic inputs.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import gpu_summary  # noqa: E402


def test_dry_run_runs_every_cpu_part_in_order_of_value(tmp_path):
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(x["name"], x["status"]) for x in report["parts"]] == [
        ("build", "skip"), ("bench", "ok"), ("tests", "ok"), ("blend", "ok"), ("econ", "ok")]
    assert {t["verdict"] for t in report["targets"]} == {"n/a"} and len(report["targets"]) == 6
    assert report["environment"]["torch"] and set(report["environment"]["tools"]) == {"nvcc", "ninja", "g++", "make"}
    assert "all parts ok" in (tmp_path / "gpu_check_summary.txt").read_text()
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.index("==== bench:") < log.index("==== tests") < log.index("==== blend") < log.index("==== econ:")
    econ = json.loads((tmp_path / "blend_gpu.json").read_text())
    assert set(econ["headline"]["ttft_ratio_128"]) == {"0.0", "0.05", "0.15", "0.3", "1.0"}
    assert econ["prompts"][-1]["clusters"] and econ["results"][-1]["recomputed"] == 128
    for name in ("kernels_gpu.json", "blend_gpu.json"):  # a dry run never writes a figure there
        path = ROOT / "benchmarks" / "results" / name
        assert not path.exists() or json.loads(path.read_text())["device"] != "cpu"


def test_parts_run_benchmark_before_tests_whatever_order_is_asked(tmp_path, monkeypatch):
    ran = []
    for name in gpu_check.PARTS:
        monkeypatch.setitem(gpu_check.PART_FNS, name,
                            lambda ctx, name=name: ran.append(name) or gpu_check._result(name, "ok", 0.0, "fake"))
    monkeypatch.setattr(gpu_check, "_environment", lambda env: dict(tools={}, warnings=[]))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "econ,tests,bench,blend,build"]) == 0
    assert ran == ["build", "bench", "tests", "blend", "econ"]


SPAWNER = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
print("bench output before the limit", flush=True)
time.sleep(300)
"""


def _gone(pid: int) -> bool:
    """No such process, or only a zombie left for its new parent to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_part_killed_at_its_limit_leaves_its_output_a_report_and_no_process(tmp_path, monkeypatch):
    pids, out = tmp_path / "pids", tmp_path / "out"

    def bench(ctx):
        ran = gpu_check.run_part(ctx, "bench", [sys.executable, "-c", SPAWNER, pids], ctx.timeout("bench"))
        return gpu_check._result("bench", gpu_check._status(ran, ran.rc == 0), ran.seconds, "spawner")

    seen = {}

    def tests(ctx):  # the next part starts with the report already naming the killed one
        seen.update(json.loads((ctx.out / "gpu_check.json").read_text()))
        return gpu_check._result("tests", "ok", 0.0, "fake")
    monkeypatch.setitem(gpu_check.PART_FNS, "bench", bench)
    monkeypatch.setitem(gpu_check.PART_FNS, "tests", tests)
    monkeypatch.setitem(gpu_check.CAPS_S, "bench", 4)
    assert gpu_check.main(["--dry-run", "--out", str(out), "--parts", "bench,tests"]) == 1
    child, grandchild = map(int, pids.read_text().split())
    assert _gone(child) and _gone(grandchild)
    assert "bench output before the limit" in (out / "gpu_check.log").read_text()
    report = json.loads((out / "gpu_check.json").read_text())
    assert [(p["name"], p["status"]) for p in report["parts"]] == [("bench", "timeout"), ("tests", "ok")]
    assert [(p["name"], p["status"]) for p in seen["parts"]] == [("bench", "timeout"), ("tests", "running")]
    assert "SOME PARTS FAILED OR TIMED OUT" in (out / "gpu_check_summary.txt").read_text()


def _row(op, case, backend, ms, **kw):
    return dict(op=op, case=case, backend=backend, ms=ms, check="ok", **kw)


def gpu_bench():
    rows = [_row("gather_chunks", "L32 T32768 x", "torch", 4.0, GBps=900.0, pct_ceiling=21.0, x_torch=1.0),
            _row("gather_chunks", "L32 T32768 x", "cuda", 1.0, GBps=3600.0, pct_ceiling=84.0, x_torch=4.0),
            _row("gather_chunks", "L32 T32768 x", "triton", 1.2, GBps=3000.0, pct_ceiling=70.0, x_torch=3.3),
            _row("gather_chunks", "L32 T32768 x", "lmcache", 1.5, GBps=2400.0, pct_ceiling=56.0, x_torch=2.7),
            _row("scatter_chunks", "L32 T32768 x", "cuda", 1.0, GBps=3000.0, pct_ceiling=70.0, x_torch=3.0),
            _row("deviation_topk", "T32768 H8 D128 k4915 bfloat16", "cuda", 0.1, x_torch=12.0),
            _row("kmeans_step", "T32768 H8 D128 C2048 bfloat16", "triton", 0.1, x_torch=4.0),
            _row("centroid_topk", "Q1 C2048 Hq32/8 D128 k64", "cuda", 0.1, x_torch=6.0),
            _row("save_blocks", "L32 blocks256", "cuda", 10.0, GBps=50.0, pct_ceiling=90.0, ceiling="d2h"),
            _row("save_blocks", "L32 blocks256", "opaque", 30.0, GBps=17.0, pct_ceiling=30.0, ceiling="d2h")]
    return dict(device="NVIDIA_H200", results=rows, ceilings=dict(copy_GBps=4300.0), notes=[])


def test_targets_are_read_from_a_gpu_benchmark():
    got = {t["op"]: (t["backend"], t["verdict"]) for t in gpu_summary.evaluate(gpu_bench())}
    assert got == {"gather_chunks": ("cuda", "PASS"), "scatter_chunks": ("cuda", "MISS"),
                   "rerotate_and_scatter": (None, "n/a"), "deviation_topk": ("cuda", "PASS"),
                   "kmeans_step": ("triton", "MISS"), "centroid_topk": ("cuda", "PASS")}
    lines = gpu_summary.peers(gpu_bench())
    assert any("save_blocks" in ln and "3.00x the opaque" in ln for ln in lines)
    assert any("lmcache" in ln and "1.50x its speed" in ln for ln in lines)


def test_summary_fits_one_screen():
    env = dict(cuda="13.0", triton="3.6.0", setuptools="70.0", tools=dict(nvcc="/x", ninja=None, make=None),
               warnings=["setuptools 70.0 < 77: " + "a long warning " * 12, "no make: run python3 tools/gpu_check.py"])
    econ = dict(headline={"full_prefill_s_4k": 0.2, "ttft_ratio_4k": {"0.0": 0.05, "1.0": 1.4},
                          "full_prefill_s_16k": 0.9, "ttft_ratio_16k": {"0.0": 0.02, "1.0": 2.1}},
                setup=dict(layers_used=32))
    report = dict(mode="full", device="NVIDIA H200", torch="2.11", seconds=400.0, budget_s=470.0, environment=env,
                  parts=[dict(name=p, status="ok", seconds=1.0, detail="d") for p in gpu_check.PARTS],
                  targets=gpu_summary.evaluate(gpu_bench()), ceilings=dict(copy_GBps=4300.0),
                  peers=gpu_summary.peers(gpu_bench()), files=["a"], blend_econ=econ)
    text = gpu_summary.summary(report)
    assert len(text.splitlines()) <= 40 and max(map(len, text.splitlines())) <= 120
    assert "missing: ninja, make" in text and "16k (full 900 ms) 0.0:0.02 1.0:2.1" in text
    assert text.endswith("all parts ok")


def test_junit_counts_backends(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite><testcase name="t[cuda-x]"/><testcase name="t[triton-x]"/>'
                    '<testcase name="t[torch]"><failure/></testcase><testcase name="u"><skipped/></testcase>'
                    '</testsuite></testsuites>')
    c = gpu_check._junit(path)
    assert (c["tests"], c["failures"], c["skipped"], c["cuda"], c["triton"]) == (4, 1, 1, 1, 1)
    assert gpu_check._junit(tmp_path / "missing.xml")["tests"] == 0


def test_streamed_pytest_lines_are_counted_with_and_without_xdist():
    text = ("[gw0] [ 10%] PASSED tests/ops/test_rope.py::test_a[cuda-bf16]\n"
            "tests/ops/test_rope.py::test_b[triton] PASSED [ 20%]\n"
            "[gw1] [ 30%] FAILED tests/ops/test_rope.py::test_c[torch]\n"
            "tests/ops/test_rope.py::test_d[cuda] SKIPPED (no GPU) [ 40%]\n")
    c = gpu_check._streamed_counts(text)
    assert (c["tests"], c["failures"], c["skipped"], c["cuda"], c["triton"]) == (4, 1, 1, 1, 1)


def test_budget_keeps_the_floors_of_later_parts():
    ctx = gpu_check.Ctx(dry=False, out=Path("."), deadline=gpu_check.time.monotonic() + 400, parts=gpu_check.PARTS)
    later = sum(gpu_check.FLOOR_S[p] for p in gpu_check.PARTS[1:])
    assert ctx.timeout("build") == pytest.approx(400 - later, abs=1)
    assert ctx.timeout("bench") == pytest.approx(gpu_check.CAPS_S["bench"], abs=1)
    assert ctx.timeout("blend", used=45) == pytest.approx(gpu_check.CAPS_S["blend"] - 45, abs=1)


TINY_MODULE = """#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mod); }
"""


def test_fallback_build_command_builds_into_a_fresh_folder(tmp_path):
    """The cpp_extension.load fallback, run as gpu_check runs it (cwd = the tree), over a tree
    whose csrc/ holds one tiny C++ module and no build/ folder: it must build and copy kvplug/_C."""
    (tmp_path / "csrc" / "include").mkdir(parents=True)
    (tmp_path / "csrc" / "module.cpp").write_text(TINY_MODULE)
    (tmp_path / "kvplug").mkdir()
    p = subprocess.run(gpu_check._load_build_cmd(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert list((tmp_path / "kvplug").glob("_C*.so"))


def _registered_ops() -> set[str]:
    """The op names csrc/ registers (m.def("name(...")), read from the sources."""
    import re
    return {m for f in (ROOT / "csrc").glob("*.cu") for m in re.findall(r'm\.def\("(\w+)\(', f.read_text())}


def test_block_save_load_cases_keep_their_cuda_rows(monkeypatch):
    """On a CUDA device with kvplug._C built from csrc/, the benchmark keeps a case's cuda backend
    exactly when the extension registers the op that backend runs; the block path's does."""
    kernels = _kernels()
    registered = _registered_ops()
    monkeypatch.setattr(kernels._backend, "has_cuda_op", lambda op: op in registered)
    monkeypatch.setattr(kernels._backend, "has_triton", lambda: True)
    seen = {}
    for _, module in kernels.discover():
        for case in kernels.module_cases(module, quick=True):
            if "cuda" in case.fns:
                keep, _ = kernels.usable_backends(case, kernels.torch.device("cuda"), forced=False)
                seen[case.op] = "cuda" in keep
    assert seen["save_blocks"] and seen["load_blocks"]
    assert {op for op, kept in seen.items() if kept} == {op for op in seen if op in registered | {"save_blocks",
                                                                                                 "load_blocks"}}


def _kernels():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernels  # noqa: PLC0415 - benchmarks/ is not a package
    kernels.kernel_bench.set_device("cpu")
    return kernels


def test_check_fails_a_backend_that_leaves_its_destination_unwritten():
    """--check refills what an in-place op writes before each run: a backend that writes nothing
    fails instead of passing on the values the reference (or the previous backend) left there."""
    kernels = _kernels()
    import kernel_bench.gather_scatter as gs  # noqa: PLC0415
    import kernel_bench.paged_io as pio  # noqa: PLC0415
    args = type("Args", (), dict(check=True, quick=True))()
    checked = []
    for case in (c for module in (gs, pio) for c in module.cases(quick=True)):  # lazily, as kernels.py runs them
        if case.op not in ("gather_chunks", "scatter_chunks", "save_blocks", "load_blocks"):
            continue
        live = case.fns["torch"]()  # the destination the op fills (out, the caches' K views, the rows)
        case.fns = {"torch": case.fns["torch"], "noop": lambda live=live: live}
        rows, _ = kernels.run_case(case, args, {"copy_GBps": 1.0}, forced=False)
        got = {r["backend"]: r["check"] for r in rows}
        checked.append(case.op)
        assert got["torch"] == "ok" and got["noop"].startswith("FAIL"), (case.op, got)
        assert all(r["ceiling_of"] == "this case's tensors" and r["ceiling_GBps"] > 0 for r in rows)
    assert checked == ["gather_chunks", "scatter_chunks", "save_blocks", "load_blocks"]


@pytest.mark.parametrize("setuptools,titles", [
    ("70.1.0", ["build (cpp_extension.load)"]),  # cannot read pyproject's PEP 639 license: setup.py never runs
    ("78.1.1", ["build", "build (cpp_extension.load)"]),  # setup.py ran and failed: the fallback
])
def test_build_takes_cpp_extension_load_when_setup_py_cannot_build(tmp_path, monkeypatch, setuptools, titles):
    ran = []

    def run_part(ctx, title, cmd, limit, env=None):
        ran.append(title)
        return gpu_check.gpu_run.Ran(rc=1, seconds=0.1, timed_out=False)
    monkeypatch.setattr(gpu_check, "run_part", run_part)
    monkeypatch.setattr(gpu_check, "_list_ops", lambda ctx: [])
    monkeypatch.setattr(gpu_check, "ensure_triton_package", lambda ctx: "linked")
    ctx = gpu_check.Ctx(dry=False, out=tmp_path, deadline=gpu_check.time.monotonic() + 400, parts=gpu_check.PARTS,
                        info=dict(setuptools=setuptools))
    result = gpu_check.part_build(ctx)
    assert ran == titles and result["status"] == "FAIL" and "cpp_extension.load" in result["detail"]


def test_environment_warns_of_old_setuptools_missing_tools_and_another_triton(monkeypatch):
    gpu_run = gpu_check.gpu_run
    monkeypatch.setattr(gpu_run, "_version", lambda name: {"setuptools": "70.3.0", "triton": "3.6.0"}[name])
    monkeypatch.setattr(gpu_run.shutil, "which", lambda name: None if name in ("make", "ninja") else f"/bin/{name}")
    monkeypatch.setattr(gpu_run, "_nvcc_version", lambda path: "release 13.0")
    info = gpu_run.environment()
    text = "\n".join(gpu_run.environment_lines(info))
    assert "setuptools 70.3.0 < 77" in text and "no ninja" in text and "no make" in text and "triton 3.6.0" in text
    assert "make=MISSING" in text and "nvcc=/bin/nvcc" in text
