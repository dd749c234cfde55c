"""Helpers that cause faults for real: small and read-only mounts, writer processes to kill, and an
engine driver that pauses between steps so a test can break something (kill redis-server) mid-run.

mount_tmpfs(path, size)          context manager: a tmpfs of `size` (e.g. "1m") mounted at path (root only)
mount_readonly(path)             context manager: an empty read-only tmpfs mounted at path
unit_key(i, tag="")              a deterministic 32-byte unit key
unit_payload(key, version, n)    the n payload bytes a writer stores for (key, version): seeded by both,
                                 so any reader can tell which version a file holds, or that it holds none
soak_prompts()                   the soak test's prompt pool: 4 long shared prefixes x 5 suffixes
shared_baseline(tmp_path_factory, model)   vLLM alone's outputs of P1, P2, P3 (tests/e2e/test_offload_e2e)
                                 and of SOAK_SAMPLE, from one engine run per pytest process (each engine
                                 start costs ~30 s of CI): {name: (step, index)} for assert_same_outputs
StepDriver(tmp_path, name, spec) a vLLM engine (offline LLM) in a child process that runs spec["steps"]
                                 one at a time; a step with "wait": true starts only after go(i):
    start()                      spawn it
    wait_step(i, timeout_s)      the result of step i (the same dict as engine_driver's), once it is done
    go(i)                        let step i start
    finish(timeout_s)            wait for the exit; every step's result

CLI (the child processes):
    python fault_helpers.py write ROOT NAME FIRST COUNT NBYTES VERSIONS ROUNDS [FSYNC]
        DiskStore puts of units FIRST..FIRST+COUNT-1, ROUNDS times over (a killed writer, a racing one);
        touches ROOT/../NAME.ready once the store is open, then waits for the file named by the
        environment variable FAULT_GO_FILE, if set
    python fault_helpers.py drive SPEC.json CTRL_DIR
        the StepDriver child: writes CTRL_DIR/step<i>.json after step i, waits for CTRL_DIR/go<i>
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUT = "fault-test-layout"
STEP_WAIT_S = 180.0  # how long a paused engine waits for its go file before giving up


# ---- mounts --------------------------------------------------------------------------------------

def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)} refused (rc {proc.returncode}): {proc.stderr.strip()}; "
                           "these fault tests need root and mount rights (CAP_SYS_ADMIN)")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)  # still busy: detach


@contextlib.contextmanager
def mount_tmpfs(path, size: str):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def mount_readonly(path):
    """An empty tmpfs remounted read-only: as root, chmod would not stop writes, EROFS does."""
    with mount_tmpfs(path, "1m") as p:
        _mount("-o", "remount,ro", str(p))
        yield p


# ---- deterministic units -------------------------------------------------------------------------

def unit_key(i: int, tag: str = "") -> bytes:
    return hashlib.sha256(f"fault-unit|{tag}|{i}".encode()).digest()


def unit_payload(key: bytes, version: str, nbytes: int):
    import numpy as np
    import torch

    seed = int.from_bytes(hashlib.sha256(key + version.encode()).digest()[:8], "little")
    return torch.from_numpy(np.frombuffer(np.random.default_rng(seed).bytes(nbytes), dtype=np.uint8).copy())


def _write_main(root: str, name: str, first: str, count: str, nbytes: str, versions: str, rounds: str,
                fsync: str = "0") -> None:
    """Unit FIRST+j gets version versions.split(",")[j % len]: two writers given "s,a" and "s,b" write the
    same bytes to the even keys and different bytes to the odd ones."""
    from kvplug.tiers.disk import DiskStore

    vs = versions.split(",")
    units = [(unit_key(i), vs[j % len(vs)]) for j, i in enumerate(range(int(first), int(first) + int(count)))]
    with DiskStore(root, LAYOUT, fsync=fsync == "1", backoff_s=0) as store:
        Path(root).parent.joinpath(f"{name}.ready").touch()
        go = os.environ.get("FAULT_GO_FILE")
        deadline = time.monotonic() + 60
        while go and not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.005)
        for _ in range(int(rounds)):
            for key, version in units:
                store.put(key, unit_payload(key, version, int(nbytes)))
                store.flush()  # one unit in flight at a time: memory stays bounded


# ---- vLLM alone, once per test session ------------------------------------------------------------

def soak_prompts() -> list[str]:
    """20 prompts, ~3 blocks of 128 tokens each: the first ~2 blocks shared by the 5 of one family."""
    def words(seed: int, n: int) -> str:
        return " ".join(f"item{(seed * 7919 + i * 104729) % 997} of list {seed}" for i in range(n))
    return [f"{words(100 + f, 22)} question {j}: {words(200 + 5 * f + j, 14)}" for f in range(4) for j in range(5)]


SOAK_SAMPLE = list(range(0, 20, 2))  # indices of soak_prompts() checked against vLLM alone
_BASELINES: dict[str, dict] = {}


def shared_baseline(tmp_path_factory, model: str) -> dict:
    if model not in _BASELINES:
        sys.path.insert(0, str(HERE.parent / "e2e"))
        from test_offload_e2e import P1, P2, P3, drive

        pool = soak_prompts()
        steps = drive(tmp_path_factory.mktemp("shared-baseline"), "baseline", {"model": model, "extra": None, "steps": [
            {"prompts": [P1]}, {"prompts": [P2, P3]}, {"prompts": [pool[i] for i in SOAK_SAMPLE]}]})
        p1, p23, soak = steps
        assert p1["logprobs"][0][0] != p23["logprobs"][0][0]  # outputs depend on the prompt
        out = {"P1": (p1, 0), "P2": (p23, 0), "P3": (p23, 1)}
        out.update({f"soak{i}": (soak, j) for j, i in enumerate(SOAK_SAMPLE)})
        _BASELINES[model] = out
    return _BASELINES[model]


# ---- an engine that pauses between steps ---------------------------------------------------------

def _drive_main(spec_path: str, ctrl: str) -> None:
    sys.path.insert(0, str(HERE.parent / "e2e"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from engine_driver import kvplug_counters
    from vllm import LLM, SamplingParams

    spec, ctrl_dir = json.loads(Path(spec_path).read_text()), Path(ctrl)
    kwargs = {}
    if spec.get("extra") is not None:
        kwargs["kv_transfer_config"] = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                                        "kv_connector_extra_config": spec["extra"]}
    llm = LLM(model=spec["model"], enforce_eager=True, max_model_len=2048, dtype="float32", seed=0,
              disable_log_stats=False, **kwargs)
    sp = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 12), logprobs=3)
    before = kvplug_counters(llm)
    for i, step in enumerate(spec["steps"]):
        if step.get("wait"):
            deadline = time.monotonic() + STEP_WAIT_S
            while not (ctrl_dir / f"go{i}").exists():
                if time.monotonic() > deadline:
                    raise SystemExit(f"step {i}: no go file after {STEP_WAIT_S} s")
                time.sleep(0.05)
        if step.get("reset_prefix_cache"):
            llm.reset_prefix_cache()
        results = llm.generate(step["prompts"], sp, use_tqdm=False)
        after = kvplug_counters(llm)
        out = {"texts": [r.outputs[0].text for r in results],
               "token_ids": [list(r.outputs[0].token_ids) for r in results],
               "logprobs": [[{str(t): lp.logprob for t, lp in pos.items()} for pos in r.outputs[0].logprobs]
                            for r in results],
               "counters": {k: after.get(k, 0) - before.get(k, 0) for k in after}}
        before = after
        tmp = ctrl_dir / f"step{i}.json.tmp"
        tmp.write_text(json.dumps(out))
        tmp.replace(ctrl_dir / f"step{i}.json")


class StepDriver:
    """See the module docstring."""

    def __init__(self, tmp_path: Path, name: str, spec: dict, env: dict):
        self.ctrl = Path(tmp_path) / f"{name}.ctrl"
        self.ctrl.mkdir(parents=True)
        self.spec_path = Path(tmp_path) / f"{name}.spec.json"
        self.spec_path.write_text(json.dumps(spec))
        self.log = Path(tmp_path) / f"{name}.log"
        self.n_steps, self.env = len(spec["steps"]), env
        self.proc: subprocess.Popen | None = None

    def start(self) -> StepDriver:
        with open(self.log, "w") as f:
            # Own session: kill() takes the engine-core child with it.
            self.proc = subprocess.Popen([sys.executable, __file__, "drive", str(self.spec_path), str(self.ctrl)],
                                         stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        return self

    def _failed(self, why: str) -> AssertionError:
        return AssertionError(f"engine {self.log.stem}: {why}\n" + self.log.read_text()[-4000:])

    def wait_step(self, i: int, timeout_s: float = 300) -> dict:
        path, deadline = self.ctrl / f"step{i}.json", time.monotonic() + timeout_s
        while not path.exists():
            if self.proc.poll() is not None:
                raise self._failed(f"exited with {self.proc.returncode} before step {i} was done")
            if time.monotonic() > deadline:
                raise self._failed(f"step {i} not done after {timeout_s} s")
            time.sleep(0.1)
        return json.loads(path.read_text())

    def go(self, i: int) -> None:
        (self.ctrl / f"go{i}").touch()

    def finish(self, timeout_s: float = 120) -> list[dict]:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._failed(f"did not exit within {timeout_s} s") from None
        if rc != 0:
            raise self._failed(f"exited with {rc}")
        return [self.wait_step(i, 1) for i in range(self.n_steps)]

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    {"write": _write_main, "drive": _drive_main}[sys.argv[1]](*sys.argv[2:])
