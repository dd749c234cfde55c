"""End to end with tensor parallelism: vLLM's CPU backend, --tensor-parallel-size 2, a tiny float32
model (4 query / 2 KV heads: one KV head per rank).

The oracle is vLLM alone with the same TP size. Prefix offload from the CPU tier and from disk,
and blending at ratio 1.0, must give vLLM alone's greedy outputs. Blending at 0.15 picks tokens
from scores each rank computes from its own heads: the ranks must agree on the picks before they
run vLLM's layers (whose all-reduces would otherwise sum partial results of different tokens).
Each rank reports a digest of its picks and the aggregated worker metadata counts mismatches
(`blend_pick_mismatches`, which must stay 0; with the agreement step removed from the blender this
test saw mismatches). Counters must add up: events once, not once per rank.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_blend_e2e import A, B, SEP, SYSTEM, doc  # noqa: E402
from test_offload_e2e import assert_same_outputs, drive, model  # noqa: E402,F401

pytestmark = pytest.mark.e2e
TP = 2
P1 = "The quick brown fox jumps over the lazy dog. " * 30  # several full blocks of the tiny tokenizer
C = SEP.join([SYSTEM, doc(2), doc(3), doc(1), "question: what is fact7 about topic 1?"])
EXTRA = {"cpu_bytes": 1e8, "blend": True, "blend_min_chunk_tokens": 8, "blend_cost_gate": False,
         "blend_audit_rate": 0.0, "namespaces": {"disk-only": {"cpu_bytes": 0}}}
STEPS = [
    {"prompts": [P1]},  # saved to the CPU tier
    {"prompts": [P1], "reset_prefix_cache": True},  # loaded from it
    {"prompts": [{"prompt": P1, "cache_salt": "disk-only"}], "reset_prefix_cache": True},  # saved to disk only
    {"prompts": [{"prompt": P1, "cache_salt": "disk-only"}], "reset_prefix_cache": True},  # loaded from disk
    {"prompts": [A], "kv_transfer_params": [{"recompute_ratio": 1.0}], "reset_prefix_cache": True},  # chunks saved
    {"prompts": [B], "kv_transfer_params": [{"recompute_ratio": 1.0}], "reset_prefix_cache": True},  # blended at 1.0
    {"prompts": [C], "kv_transfer_params": [{"recompute_ratio": 0.15}], "reset_prefix_cache": True},  # picked
]


@pytest.fixture(scope="module")
def full_blocks(model):
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(model)(P1).input_ids)
    return (n - 1) // 128


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    alone = drive(tmp_path_factory.mktemp("tp-alone"), "alone",
                  {"model": model, "extra": None, "tensor_parallel_size": TP,
                   "steps": [{k: v for k, v in s.items() if k != "kv_transfer_params"} for s in STEPS]})
    work = tmp_path_factory.mktemp("tp-kvplug")
    kvplug = drive(work, "kvplug", {"model": model, "tensor_parallel_size": TP, "steps": STEPS,
                                    "extra": {**EXTRA, "disk_path": str(work / "disk")}})
    return alone, kvplug


def test_prefix_offload_with_tp2_serves_vllm_alones_outputs_and_counts_each_hit_once(runs, full_blocks):
    alone, kvplug = runs
    for step in range(4):
        assert_same_outputs(kvplug[step], (alone[step], 0))
    assert full_blocks >= 2
    assert kvplug[1]["counters"]["cpu_hit_tokens"] == full_blocks * 128  # not once per rank
    assert kvplug[3]["counters"]["disk_hit_tokens"] == full_blocks * 128


def test_blend_at_ratio_one_with_tp2_matches_vllm_alone(runs):
    alone, kvplug = runs
    assert_same_outputs(kvplug[5], (alone[5], 0))
    c = kvplug[5]["counters"]
    # Once, not once per rank (blend_seconds is a float: vLLM's offline get_metrics truncates counters
    # to whole numbers, so a sub-second blend reads 0 there; /metrics has the exact value).
    assert c["blend_requests"] == 1 and c["blend_batches"] == 1 and c["blend_chunk_hits"] == 4
    assert c["blend_tokens"] == c["blend_recomputed_tokens"]


def test_blend_at_015_with_tp2_picks_the_same_tokens_on_both_ranks(runs):
    _, kvplug = runs
    c = kvplug[6]["counters"]
    assert c["blend_requests"] == 1 and 0 < c["blend_recomputed_tokens"] < c["blend_tokens"]
    assert c.get("blend_pick_mismatches", 0) == 0
