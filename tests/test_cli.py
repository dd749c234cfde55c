"""The `kvplug` command line, run as `python -m kvplug.cli.main` in a subprocess: stats on a
cache directory (read-only) and on a server's /metrics, clear (only kvplug files), warm end to
end on the tiny model, bench forwarding, and errors that are one line with exit status 2."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvplug.tiers.disk import DiskStore, unit_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # never for vLLM engines
METRICS = """\
# HELP vllm:kvplug_cpu_hit_tokens_total Tokens served from the CPU tier.
# TYPE vllm:kvplug_cpu_hit_tokens_total counter
vllm:kvplug_cpu_hit_tokens_total{engine="0",model_name="/m/Smol LM"} 384.0
vllm:kvplug_cpu_hit_tokens_total{engine="1",model_name="/m/Smol LM"} 128.0
vllm:kvplug_cpu_hit_tokens_created{engine="0",model_name="/m/Smol LM"} 1.7640e+09
vllm:kvplug_disk_hit_tokens_total{engine="0"} 256.0
vllm:kvplug_lookup_tokens_total{engine="0"} 1024.0
vllm:kvplug_saved_blocks_total{engine="0",note="a } b"} 7
vllm:prefix_cache_hits_total{engine="0"} 256.0
"""


def kvplug(*args: str, stdin=subprocess.DEVNULL, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvplug.cli.main", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, stdin=stdin, timeout=timeout)


CHUNK_B = "chunk-v2|float32|L2KV2D64|keys-at-0"


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.fixture
def cache(tmp_path) -> Path:
    """3 prefix-block units of layout A, 2 blend-chunk units of layout B (its tag starts with
    "chunk-v2|", as the worker writes them), one truncated unit, a stale temp file, two files
    that are not kvplug's (one in the root, one in a fan-out folder)."""
    root = tmp_path / "cache"
    gen = torch.Generator().manual_seed(0)
    keys = [bytes([i]) * 32 for i in range(1, 7)]
    for layout, ks in (("layout-A", keys[:3]), (CHUNK_B, keys[3:])):
        with DiskStore(root, layout) as store:
            for k in ks:
                store.put(k, torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=gen))
    bad = unit_path(root, keys[5], 0)
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated: an engine would reject it
    stale = bad.with_name(f"{bad.name}.123.{'ab' * 6}.tmp")
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    (root / "NOTES.txt").write_text("not kvplug's")
    (unit_path(root, keys[0], 0).parent / "readme.md").write_text("not kvplug's either")
    return root


def test_stats_counts_and_deletes_nothing(cache):
    before = snapshot(cache)
    out = kvplug("stats", str(cache), "--json")
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["units"] == 5 and s["corrupt"] == 1 and s["tmp_files"] == 1 and s["other_files"] == 2
    assert s["layouts"] == {"layout-A": 3, CHUNK_B: 2}
    assert [Path(p).relative_to(cache).parts[0] for p in s["corrupt_files"]] == ["06"]  # the truncated one
    assert s["bytes"] == sum(v for k, v in before.items() if k.endswith(".kvp") and not k.startswith("06"))
    assert s["oldest_mtime"] <= s["newest_mtime"]
    text = kvplug("stats", str(cache), "--verify")
    assert text.returncode == 0 and "5 (" in text.stdout and "layout-A" in text.stdout
    assert snapshot(cache) == before


def test_stats_reports_prefix_blocks_and_blend_chunks_separately(cache):
    """Both kinds share disk_path; the layout tag's "chunk-v2|" prefix tells them apart. The
    oracle for the byte counts is the file sizes on disk, by fan-out folder (keys 01-03 are
    blocks, 04-05 chunks, 06 is the truncated one)."""
    sizes = snapshot(cache)
    by_dir = lambda dirs: sum(v for k, v in sizes.items() if k.endswith(".kvp") and k[:2] in dirs)  # noqa: E731
    s = json.loads(kvplug("stats", str(cache), "--json").stdout)
    assert s["kinds"] == {"block": {"units": 3, "bytes": by_dir({"01", "02", "03"})},
                          "chunk": {"units": 2, "bytes": by_dir({"04", "05"})},
                          "sglang": {"units": 0, "bytes": 0}}
    text = kvplug("stats", str(cache)).stdout
    assert re.search(r"^ +prefix blocks +3 \(", text, re.M) and re.search(r"^ +blend chunks +2 \(", text, re.M)
    assert "SGLang" not in text  # no SGLang pages here: no line for them


def test_stats_counts_sglang_pages_as_their_own_kind(tmp_path):
    root = tmp_path / "cache"
    with DiskStore(root, "sglang;pool=MHATokenToKVPoolHost;namespace=\"\"") as store:
        store.put(b"\x07" * 32, torch.arange(64, dtype=torch.uint8))
    with DiskStore(root, "CPUAttentionBackendImpl:amx|blocks") as store:
        store.put(b"\x08" * 32, torch.arange(64, dtype=torch.uint8))
    s = json.loads(kvplug("stats", str(root), "--json").stdout)
    assert {k: v["units"] for k, v in s["kinds"].items()} == {"block": 1, "chunk": 0, "sglang": 1}
    assert re.search(r"^ +SGLang pages +1 \(", kvplug("stats", str(root)).stdout, re.M)


def test_clear_yes_removes_only_kvplug_files(cache):
    out = kvplug("clear", str(cache), "--yes")
    assert out.returncode == 0, out.stderr
    left = snapshot(cache)
    assert not [k for k in left if k.endswith((".kvp", ".tmp"))]
    assert "NOTES.txt" in left and any(k.endswith("readme.md") for k in left)
    assert len([k for k in left if re.fullmatch(r"[0-9a-f]{2}", k)]) == 1  # emptied folders removed
    assert "removed 7 files" in out.stdout  # 6 units (one corrupt) + 1 stale temp file


def test_clear_without_yes_refuses_on_non_interactive_stdin(cache):
    before = snapshot(cache)
    out = kvplug("clear", str(cache))
    assert out.returncode == 2
    assert "--yes" in out.stderr and "Traceback" not in out.stderr
    assert ".kvp" in out.stdout  # it listed what it would remove
    assert snapshot(cache) == before


@pytest.mark.parametrize("cmd", ["stats", "clear"])
def test_missing_or_foreign_dir_is_one_line_status_2(tmp_path, cmd):
    out = kvplug(cmd, str(tmp_path / "nope"), "--yes" if cmd == "clear" else "--json")
    assert out.returncode == 2 and "no such directory" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    (tmp_path / "mine.txt").write_text("x")
    out = kvplug(cmd, str(tmp_path))
    assert out.returncode == 2 and "not a kvplug cache directory" in out.stderr
    assert (tmp_path / "mine.txt").exists()


def test_empty_dir_is_an_empty_cache(tmp_path):
    out = kvplug("stats", str(tmp_path), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["units"] == 0


@pytest.fixture
def metrics_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = METRICS.encode() if self.path == "/metrics" else b"not found"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_stats_url_sums_kvplug_counters(metrics_server):
    out = kvplug("stats", "--url", metrics_server, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["counters"] == {"cpu_hit_tokens": 512.0, "disk_hit_tokens": 256.0,
                               "lookup_tokens": 1024.0, "saved_blocks": 7.0}
    assert got["derived"]["hit_ratio"] == pytest.approx(0.75)
    table = kvplug("stats", "--url", metrics_server.removeprefix("http://") + "/metrics")
    assert table.returncode == 0
    assert re.search(r"cpu_hit_tokens\s+512\n", table.stdout)


def test_stats_url_unreachable_is_one_line_status_2():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = kvplug("stats", "--url", f"http://127.0.0.1:{port}", "--timeout", "5")
    assert out.returncode == 2 and "cannot reach" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_stats_needs_exactly_one_source(tmp_path, metrics_server):
    assert kvplug("stats").returncode == 2
    assert kvplug("stats", str(tmp_path), "--url", metrics_server).returncode == 2


def test_import_is_light():
    code = ("import sys, kvplug.cli.main, kvplug.cli.cache_dir, kvplug.cli.metrics, kvplug.cli.warm\n"
            "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr


def test_bench_forwards_to_offload_benchmark():
    out = kvplug("bench", "--help")
    assert out.returncode == 0, out.stderr
    assert "offload" in out.stdout.lower() and "--quick" in out.stdout


def test_help_says_what_warm_hits():
    out = kvplug("warm", "--help")
    assert out.returncode == 0 and "BEGINS with the document's exact text" in out.stdout
    assert "--blend" in out.stdout and "at any position" in out.stdout


@pytest.mark.e2e
def test_warm_stores_documents_on_disk(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import tiny_model_path

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        words = " ".join(f"item{(i * 7919 + j * 104729) % 997} of list {i}" for j in range(60))
        (docs / f"doc{i}.txt").write_text(words)
    (docs / "ignored.md").write_text("not a document")
    disk = tmp_path / "disk"
    out = subprocess.run([sys.executable, "-m", "kvplug.cli.main", "warm", "--model", str(tiny_model_path()),
                          "--disk-path", str(disk), "--max-model-len", "2048", str(docs)],
                         cwd=ROOT, env={**ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    m = re.search(r"kvplug warm: (\d+) documents prefilled, (\d+) blocks stored; "
                  r"unit files in \S+: 0 -> (\d+)", out.stdout)
    assert m, out.stdout[-2000:]
    n_docs, blocks, files = map(int, m.groups())
    assert n_docs == 2 and blocks > 0 and files == blocks
    assert len(list(disk.glob("??/*.kvp"))) == blocks
    assert re.search(r"doc0\.txt\s+\d+\s+[1-9]", out.stdout)  # per-document row with blocks
    stats = json.loads(kvplug("stats", str(disk), "--json", "--verify").stdout)
    assert stats["units"] == blocks and stats["corrupt"] == 0


def test_warm_blend_stores_chunks_in_both_forms(tmp_path):
    """--blend: each document becomes two chunks (first in a prompt, after a separator), on disk."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import tiny_model_path

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"doc{i}.txt").write_text(" ".join(f"fact{(i * 31 + j * 17) % 97} of topic {i}" for j in range(40)))
    disk = tmp_path / "disk"
    out = subprocess.run([sys.executable, "-m", "kvplug.cli.main", "warm", "--blend", "--model",
                          str(tiny_model_path()), "--disk-path", str(disk), "--max-model-len", "2048", str(docs)],
                         cwd=ROOT, env={**ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    chunks = re.search(r"blend chunks: (\d+) stored", out.stdout)
    files = re.search(r"(\d+) blocks stored; unit files in \S+: 0 -> (\d+)", out.stdout)
    assert chunks and files, out.stdout[-2000:]
    blocks, after = map(int, files.groups())
    assert chunks.group(1) == "4" and after == blocks + 4  # chunks share the disk tier with the blocks
    assert len(list(disk.glob("??/*.kvp"))) == blocks + 4
    # kvplug stats tells them apart by the tags the worker wrote (its chunk_layout).
    kinds = json.loads(kvplug("stats", str(disk), "--json", "--verify").stdout)["kinds"]
    assert (kinds["block"]["units"], kinds["chunk"]["units"], kinds["sglang"]["units"]) == (blocks, 4, 0)
