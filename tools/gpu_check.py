"""`make gpu-check`: the one prepared check for a GPU machine (H100/H200 with torch, triton and
nvcc; no vLLM, no network), at most 8 minutes, its files straight under $OUT as it goes.

    python3 tools/gpu_check.py [--dry-run] [--out DIR] [--budget-s 465] [--parts build,bench,...]

First it prints the versions of python, torch, CUDA, triton and setuptools, the GPU, and where
nvcc, ninja, g++ and make are (tools/gpu_run.py's environment(), with its warnings). Then the
parts, most valuable first, each one process group with its own time limit (CAPS_S, less the
FLOOR_S kept for the parts after it), killed as a group at that limit; a part that fails or
times out never stops the next:
    build   kvplug._C: setup.py build_ext --inplace (sm_90, ninja's parallel jobs), or torch's
            cpp_extension.load where setuptools < 77 cannot read pyproject.toml or setup.py failed;
            then the ops it registers
    bench   benchmarks/kernels.py --check -> OUT/kernels_gpu.json, rewritten after every case:
            per op and backend time, GB/s, the copy ceiling of the case's own bytes, x torch
            (LMCache beside where it imports), read against the issue's targets (gpu_summary.py)
    tests   pytest tests/ops, tests/tiers/test_paged_io.py, tests/tiers/test_block_io.py with
            TRITON_INTERPRET=0 on CUDA (pytest-xdist where installed) -> OUT/junit.xml; counted
            from the streamed log when the limit cuts it short
    blend   tools/blend_check.py: the blender's KV on a random Llama-3.2-1B-shaped model in bf16
            (and a tiny one in fp32) against a reference forward
    econ    tools/blend_gpu.py -> OUT/blend_gpu.json: TTFT of blending at ratio 0..1 against a
            full prefill, Llama-3.1-8B-shaped random model, 4K and 16K-token prompts
Every part's output is appended to OUT/gpu_check.log line by line as it prints (and echoed here);
OUT/gpu_check.json and gpu_check_summary.txt are rewritten before and after every part, so a
run cut off anywhere leaves what it measured. Nothing is written into benchmarks/results: the
session that ran it copies kernels_gpu.json and blend_gpu.json there.
--dry-run runs what a CPU can, in about a minute (CI runs it): no build, the test selection's
paths checked and test_paged_io.py run, the blend check (bf16) and the blend economics on tiny
models, the benchmark at --quick sizes. OUT: --out, else $OUT when set, else benchmarks/results/gpu_check.

Methods:
    run_part(ctx, title, cmd, limit, env) -> gpu_run.Ran   one command, streamed, group-killed
    part_build / part_bench / part_tests / part_blend / part_econ (ctx) -> dict   status
                    (ok / FAIL / timeout / skip), seconds, detail
    write_report(ctx) / main(argv)   exit 1 when a part fails or times out (a missed target is
                                     reported, not failed)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_run  # noqa: E402
import gpu_summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("build", "bench", "tests", "blend", "econ")
# Each part's own limit, and what the parts before it leave it at least (the floors of the parts
# after a part are taken off its limit). Sized by estimate for an H100 (no run yet): build ~90 s
# with 16 nvcc jobs, the benchmark's cases ~60-120 s, the CUDA tests ~100 s, the blend check
# ~30 s, the blend economics ~50 s; the total stays within --budget-s 465 whatever happens.
CAPS_S = {"build": 180, "bench": 150, "tests": 100, "blend": 50, "econ": 110}
FLOOR_S = {"build": 60, "bench": 100, "tests": 40, "blend": 30, "econ": 80}
TEST_PATHS = ["tests/ops", "tests/tiers/test_paged_io.py", "tests/tiers/test_block_io.py"]
OPS = ("gather_chunks", "scatter_chunks", "rerotate_and_scatter", "rerotate_keys", "deviation_topk",
       "kmeans_step", "centroid_topk", "merge_clusters")
BUILD_DIR = "build/gpu_check_ext"


@dataclass
class Ctx:
    dry: bool
    out: Path
    deadline: float
    parts: tuple[str, ...]
    env: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # gpu_run.environment()
    results: dict = field(default_factory=dict)  # part name -> its result
    started: float = 0.0
    budget_s: float = 0.0
    triton_note: str = ""

    @property
    def log(self) -> Path:
        return self.out / "gpu_check.log"

    def timeout(self, name: str, used: float = 0.0) -> float:
        """Seconds the part may still run: its cap less what it used, within what the parts after
        it keep (their floors) of the run's deadline; at least 5."""
        later = sum(FLOOR_S[p] for p in self.parts[self.parts.index(name) + 1:])
        return max(5.0, min(CAPS_S[name] - used, self.deadline - time.monotonic() - later))


def run_part(ctx: Ctx, title: str, cmd: list[str], limit: float, env: dict | None = None) -> gpu_run.Ran:
    return gpu_run.run([str(c) for c in cmd], ctx.log, limit, ROOT, {**ctx.env, **(env or {})}, title)


def _result(name, status, seconds, detail, **extra) -> dict:
    return dict(name=name, status=status, seconds=round(seconds, 1), detail=detail, **extra)


def _status(ran: gpu_run.Ran, ok: bool) -> str:
    return "timeout" if ran.timed_out else "ok" if ok else "FAIL"


def _note(ctx: Ctx, line: str) -> None:
    with open(ctx.log, "a", encoding="utf-8") as f:
        f.write(f"==== {line}\n")
    print(f"==== {line}", flush=True)


def ensure_triton_package(ctx: Ctx) -> str:
    """Our Triton kernels install as kvplug._triton (setup.py's package_dir). Where kvplug is not
    installed (the GPU machine), link kvplug/_triton -> ../triton_kernels (git-ignored). Once,
    after the build (setup.py's find_packages would otherwise see the link as a package too)."""
    if not ctx.triton_note:
        ctx.triton_note = _link_triton(ctx)
        _note(ctx, ctx.triton_note)
    return ctx.triton_note


def _link_triton(ctx: Ctx) -> str:
    probe = [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('kvplug._triton') is not None)"]
    found = subprocess.run(probe, cwd=ROOT, env=ctx.env, capture_output=True, text=True).stdout.strip() == "True"
    if found:
        return "kvplug._triton importable"
    link = ROOT / "kvplug" / "_triton"
    try:
        link.symlink_to(Path("..") / "triton_kernels", target_is_directory=True)
    except OSError:
        shutil.copytree(ROOT / "triton_kernels", link)
    return "linked kvplug/_triton -> triton_kernels"


# ---- build ------------------------------------------------------------------------------
def _list_ops(ctx: Ctx) -> list[str]:
    code = ("from kvplug.ops import _backend; import sys; "
            f"print(','.join(o for o in {OPS!r} if _backend.has_cuda_op(o)))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ctx.env, capture_output=True, text=True)
    return [o for o in p.stdout.strip().split(",") if o]


def _load_build_cmd() -> list[str]:
    """torch's cpp_extension.load over csrc/, run in the tree's root; it opens <build_directory>/lock
    first and never makes the folder itself."""
    code = ("import glob, os, shutil, sysconfig, torch.utils.cpp_extension as c; "
            f"os.makedirs('{BUILD_DIR}', exist_ok=True); "
            "m = c.load(name='_C', sources=sorted(glob.glob('csrc/*.cu') + glob.glob('csrc/*.cpp')), "
            f"extra_include_paths=['csrc/include'], extra_cflags=['-O3'], build_directory='{BUILD_DIR}', "
            "extra_cuda_cflags=['-O3', '--use_fast_math', '-gencode=arch=compute_90,code=sm_90'], verbose=True); "
            "shutil.copy(m.__file__, 'kvplug/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
    return [sys.executable, "-c", code]


def _setuptools_reads_pyproject(ctx: Ctx) -> bool:
    return gpu_run._tuple(ctx.info.get("setuptools")) >= gpu_run.SETUPTOOLS_PEP639


def part_build(ctx: Ctx) -> dict:
    if ctx.dry:
        return _result("build", "skip", 0.0, "dry run: no CUDA here (CI compiles csrc/ in test_cuda_compile)")
    env = {"KVPLUG_CUDA_ARCHS": "90", "MAX_JOBS": str(os.cpu_count() or 8)}
    seconds, ran, how = 0.0, None, "setup.py build_ext --inplace"
    if _setuptools_reads_pyproject(ctx):
        ran = run_part(ctx, "build", [sys.executable, "setup.py", "build_ext", "--inplace"], ctx.timeout("build"), env)
        seconds = ran.seconds
    if ran is None or (not ran.timed_out and (ran.rc != 0 or not _list_ops(ctx))):
        why = "setuptools < 77" if ran is None else "setup.py failed, see the log"
        ran = run_part(ctx, "build (cpp_extension.load)", _load_build_cmd(), ctx.timeout("build", seconds), env)
        seconds, how = seconds + ran.seconds, f"cpp_extension.load ({why})"
    ops = _list_ops(ctx)
    note = ensure_triton_package(ctx)
    status = _status(ran, ran.rc == 0 and set(ops) == set(OPS))
    return _result("build", status, seconds, f"{how}: kvplug._C has {len(ops)}/{len(OPS)} ops; {note}", ops=ops)


# ---- bench ------------------------------------------------------------------------------
def part_bench(ctx: Ctx) -> dict:
    target = ctx.out / ("kernels_dry.json" if ctx.dry else "kernels_gpu.json")
    target.unlink(missing_ok=True)  # an earlier run's file in the same folder is not this run's
    limit = ctx.timeout("bench")
    if not ctx.dry:
        ensure_triton_package(ctx)
    cmd = [sys.executable, "benchmarks/kernels.py", "--check", "--json", target,
           "--budget-s", f"{max(limit - 25, 5):.0f}"]
    cmd += ["--quick", "--device", "cpu", "--threads", "1"] if ctx.dry else ["--device", "cuda"]
    ran = run_part(ctx, "bench", cmd, limit)
    bench = json.loads(target.read_text()) if target.exists() else {}
    rows = bench.get("results", [])
    fails = [f"{r['op']}/{r['backend']}" for r in rows if r["check"].startswith("FAIL")]
    skipped = [n for n in bench.get("notes", []) if "not run" in n]
    detail = f"{len(rows)} rows, check failures: {', '.join(fails) or 'none'}" + \
        (f"; {len(skipped)} cases not run (budget)" if skipped else "") + ("; TIMED OUT" if ran.timed_out else "")
    return _result("bench", _status(ran, bool(rows) and not fails and ran.rc == 0), ran.seconds, detail, bench=bench)


# ---- tests ------------------------------------------------------------------------------
def _junit(path: Path) -> dict:
    counts = dict(tests=0, failures=0, errors=0, skipped=0, cuda=0, triton=0)
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {c.tag for c in case}
        _count(counts, case.get("name", ""), "failure" in kinds, "error" in kinds, "skipped" in kinds)
    return counts


def _count(counts: dict, name: str, failed: bool, error: bool, skipped: bool) -> None:
    counts["tests"] += 1
    counts["failures"] += failed
    counts["errors"] += error
    counts["skipped"] += skipped
    if not (failed or error or skipped):
        counts["cuda"] += "cuda" in name
        counts["triton"] += "triton" in name


_OUTCOME = "(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
_VERBOSE = re.compile(rf"(\S+::\S+)\s+{_OUTCOME}|{_OUTCOME}\s+(\S+::\S+)")


def _streamed_counts(text: str) -> dict:
    """The counts of `pytest -v` lines (with or without xdist) in the part's log: what a run cut
    short by its limit reached, junit.xml being written only at the end."""
    counts = dict(tests=0, failures=0, errors=0, skipped=0, cuda=0, triton=0)
    for m in _VERBOSE.finditer(text):
        name, word = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        _count(counts, name, word == "FAILED", word == "ERROR", word in ("SKIPPED", "XFAIL"))
    return counts


def _tests_detail(c: dict) -> str:
    return (f"{c['tests'] - c['failures'] - c['errors'] - c['skipped']} passed, {c['failures']} failed, "
            f"{c['errors']} errors, {c['skipped']} skipped; passed with a cuda/triton id: {c['cuda']}/{c['triton']}")


def part_tests(ctx: Ctx) -> dict:
    base = [sys.executable, "-m", "pytest", "-v", "-ra", "-p", "no:cacheprovider"]
    junit = ctx.out / "junit.xml"
    junit.unlink(missing_ok=True)
    if ctx.dry:  # the selection's paths must exist; the block path's tests are quick enough to run
        missing = [t for t in TEST_PATHS if not (ROOT / t).exists()]
        ran = run_part(ctx, "tests (run)", base + ["tests/tiers/test_paged_io.py", f"--junitxml={junit}"],
                       ctx.timeout("tests"))
        c = _junit(junit)
        detail = f"CUDA selection: {'missing ' + ', '.join(missing) if missing else 'every path there'}; " \
            f"test_paged_io.py: {_tests_detail(c)}"
        return _result("tests", _status(ran, ran.rc == 0 and not missing), ran.seconds, detail, counts=c)
    ensure_triton_package(ctx)
    xdist = ["-n", str(min(8, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    ran = run_part(ctx, "tests", base + [*TEST_PATHS, "--ignore=tests/ops/test_cuda_compile.py", *xdist,
                                         f"--junitxml={junit}"], ctx.timeout("tests"), {"TRITON_INTERPRET": "0"})
    c = _junit(junit) if junit.exists() else _streamed_counts(gpu_run.section(ctx.log, ran))
    detail = _tests_detail(c) + ("" if junit.exists() else " (counted from the log: no junit.xml)")
    return _result("tests", _status(ran, ran.rc == 0 and c["tests"] > 0 and c["cuda"] > 0), ran.seconds,
                   detail + ("; TIMED OUT" if ran.timed_out else ""), counts=c)


# ---- blend ------------------------------------------------------------------------------
def part_blend(ctx: Ctx) -> dict:
    runs = [("cpu", "bfloat16", "tiny")] if ctx.dry else \
        [("cuda", "bfloat16", "llama-1b"), ("cuda", "float32", "tiny")]
    checks, seconds, status, detail = [], 0.0, "ok", []
    if not ctx.dry:
        ensure_triton_package(ctx)
    for device, dtype, shape in runs:
        if CAPS_S["blend"] - seconds < 10:
            detail.append(f"{shape} {dtype}: not run (the part's time is spent)")
            continue
        path = ctx.out / f"blend_{shape}_{dtype}.json"
        ran = run_part(ctx, f"blend {shape} {dtype}", [sys.executable, "tools/blend_check.py", "--device", device,
                                                       "--dtype", dtype, "--shape", shape, "--json", path],
                       ctx.timeout("blend", seconds))
        seconds += ran.seconds
        got = json.loads(path.read_text())["checks"] if path.exists() else []
        path.unlink(missing_ok=True)  # its lines are in gpu_check.json: $OUT returns 8 files at most
        checks.append(dict(device=device, dtype=dtype, shape=shape, rc=ran.rc, checks=got))
        bad = [c["name"] for c in got if not c["ok"]] or ([] if ran.rc == 0 else [f"rc {ran.rc}"])
        status = "timeout" if ran.timed_out else "FAIL" if (bad or not got) and status != "timeout" else status
        errs = " ".join(f"{c['name']} {gpu_summary._fmt(c['error'], '.2g')}" for c in got if c["name"] != "partial")
        detail.append(f"{shape} {dtype}: {'ok' if not bad else 'FAIL ' + ','.join(bad)} ({errs})")
    return _result("blend", status, seconds, "; ".join(detail), runs=checks)


# ---- econ -------------------------------------------------------------------------------
def part_econ(ctx: Ctx) -> dict:
    target = ctx.out / "blend_gpu.json"
    target.unlink(missing_ok=True)
    limit = ctx.timeout("econ")
    if not ctx.dry:
        ensure_triton_package(ctx)
    cmd = [sys.executable, "tools/blend_gpu.py", "--json", target, "--budget-s", f"{max(limit - 15, 5):.0f}"]
    ran = run_part(ctx, "econ", cmd + (["--dry-run"] if ctx.dry else []), limit)
    econ = json.loads(target.read_text()) if target.exists() else {}
    rows = econ.get("results", [])
    errors = [f"{r['prompt']}@{r['ratio']}" for r in rows if r.get("error")]
    missing = econ.get("not_run", [])
    ok = ran.rc == 0 and bool(rows) and not errors  # cells the budget left out are said, as the bench's
    kv_err = [r["kv_rel_error_vs_full"] for r in rows if r.get("kv_rel_error_vs_full") is not None]
    detail = gpu_summary.econ_line(econ) + (f"; errors: {', '.join(errors)}" if errors else "") + \
        (f"; {len(missing)} not run (budget)" if missing else "") + \
        (f"; ratio-1 KV vs full prefill: rel err <= {max(kv_err):.2g}" if kv_err else "") + \
        (f"; {econ['error']}" if econ.get("error") else "")
    return _result("econ", _status(ran, ok), ran.seconds, detail, econ=econ)


PART_FNS = {"build": part_build, "bench": part_bench, "tests": part_tests, "blend": part_blend, "econ": part_econ}


# ---- report -----------------------------------------------------------------------------
def _report(ctx: Ctx) -> dict:
    parts = [ctx.results.get(p) or _result(p, "pending", 0.0, "not started") for p in ctx.parts]
    bench = next((p["bench"] for p in parts if "bench" in p), {})
    econ = next((p["econ"] for p in parts if "econ" in p), {})
    return dict(mode="dry-run" if ctx.dry else "full", device=ctx.info.get("gpu") or "cpu",
                torch=ctx.info.get("torch"), environment=ctx.info, budget_s=ctx.budget_s,
                seconds=round(time.monotonic() - ctx.started, 1),
                parts=[{k: v for k, v in p.items() if k not in ("bench", "econ")} for p in parts],
                targets=gpu_summary.evaluate(bench) if bench else [], ceilings=bench.get("ceilings", {}),
                peers=gpu_summary.peers(bench) if bench else [], bench_notes=bench.get("notes", []),
                blend_econ=dict(headline=econ.get("headline", {}), setup=econ.get("setup", {})) if econ else {})


def write_report(ctx: Ctx) -> str:
    """gpu_check.json and the summary as things stand (written before and after every part)."""
    report = _report(ctx)
    report["files"] = sorted({f.name for f in ctx.out.iterdir() if f.is_file()} |
                             {"gpu_check.json", "gpu_check.log", "gpu_check_summary.txt"})
    text = gpu_summary.summary(report)
    for name, body in (("gpu_check.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_check_summary.txt", text + "\n")):
        tmp = ctx.out / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(ctx.out / name)  # never half a file, whenever the run is cut off
    return text


def _run_parts(ctx: Ctx) -> None:
    for name in ctx.parts:
        ctx.results[name] = _result(name, "running", 0.0, f"started, limit {ctx.timeout(name):.0f} s")
        write_report(ctx)
        start = time.monotonic()
        try:
            ctx.results[name] = PART_FNS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - the check itself broke: say where, run the rest
            _note(ctx, f"{name}: gpu_check error {type(exc).__name__}: {exc}")
            ctx.results[name] = _result(name, "FAIL", time.monotonic() - start, f"gpu_check error: {exc}"[:200])
        write_report(ctx)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU parts only, quick (what CI runs)")
    p.add_argument("--out", type=Path, help="output folder (default $OUT, else benchmarks/results/gpu_check)")
    p.add_argument("--budget-s", type=float, default=465.0, help="wall-clock budget for all parts")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    return p.parse_args(argv)


def _environment(env: dict) -> dict:
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_run.py"))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return dict(error=(p.stdout + p.stderr)[-500:], tools={}, warnings=["environment probe failed"])


def _context(args) -> Ctx:
    parts = tuple(p for p in args.parts.split(",") if p)
    if not set(parts) <= set(PARTS):
        raise SystemExit(f"--parts {args.parts!r}: allowed are {', '.join(PARTS)}")
    parts = tuple(p for p in PARTS if p in parts)  # always in order of value
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():  # setup.py looks on PATH
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/local/cuda/bin"])
    if not args.dry_run:  # compiled Triton on CUDA tensors, whatever the caller's environment says
        env["TRITON_INTERPRET"] = "0"
    started = time.monotonic()
    return Ctx(dry=args.dry_run, out=out, deadline=started + args.budget_s, parts=parts, env=env,
               started=started, budget_s=args.budget_s)


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = _context(args)
    ctx.log.write_text("")
    ctx.info = _environment(ctx.env)
    for line in gpu_run.environment_lines(ctx.info):
        _note(ctx, line)
    if not ctx.dry and not ctx.info.get("gpu"):
        write_report(ctx)
        raise SystemExit("no CUDA device here: run with --dry-run (CPU parts only)")
    _run_parts(ctx)
    text = write_report(ctx)
    print(text)
    return 0 if all(ctx.results[p]["status"] in ("ok", "skip") for p in ctx.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
