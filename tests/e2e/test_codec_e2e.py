"""End to end on real vLLM (CPU): prefix offload through a disk tier with disk_codec=int8.

Blocks travel as the CPU backend's opaque (ISA-packed) bytes; the codec reaches their K/V through the
backend's probed write order. The oracle is vLLM without the connector: the greedy tokens served from
compressed blocks must be identical, the top logprobs close (int8 KV moves them a little, float32
noise does not explain it: the bound is stated below), and the files on disk a third of the engine's
float32 bytes or less. kvplug's own counters prove the tokens came from the disk tier.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_offload_e2e import BLOCK, P1, P2, drive  # noqa: E402
from tiny_model import tiny_model_path  # noqa: E402

from kvplug.tiers.disk_format import read_header  # noqa: E402

pytestmark = pytest.mark.e2e
LOGPROB_TOL = 0.05  # int8 KV: the largest |delta| seen on this model was 0.021


@pytest.fixture(scope="module")
def model():
    return str(tiny_model_path())


def test_int8_disk_tier_serves_the_same_greedy_tokens_as_vllm_alone(model, tmp_path):
    (b1, b2) = drive(tmp_path, "baseline", {"model": model, "extra": None,
                                            "steps": [{"prompts": [P1]}, {"prompts": [P2]}]})
    disk = tmp_path / "disk"
    extra = {"cpu_bytes": 0, "disk_path": str(disk), "disk_bytes": 1e9, "disk_codec": "int8"}
    cold, hit, hit2 = drive(tmp_path, "int8", {"model": model, "extra": extra, "steps": [
        {"prompts": [P1, P2]},
        {"prompts": [P1], "reset_prefix_cache": True},
        {"prompts": [P2], "reset_prefix_cache": True},
    ]})
    for got, want in ((cold, b1), (hit, b1), (hit2, b2)):
        assert got["token_ids"][0] == want["token_ids"][0]
        for pos_got, pos_want in zip(got["logprobs"][0], want["logprobs"][0]):
            for tok, lp in pos_want.items():
                if tok in pos_got:
                    assert abs(pos_got[tok] - lp) < LOGPROB_TOL, (tok, pos_got[tok], lp)
    assert hit["counters"]["disk_hit_tokens"] == 3 * BLOCK and hit2["counters"]["disk_hit_tokens"] == 3 * BLOCK
    assert hit["counters"].get("load_errors", 0) == 0 and hit["counters"].get("disk_corrupt", 0) == 0
    cfg = json.loads((Path(model) / "config.json").read_text())
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    raw_block = cfg["num_hidden_layers"] * 2 * BLOCK * cfg["num_key_value_heads"] * head * 4  # fp32
    files = sorted(disk.rglob("*.kvp"))
    assert len(files) == 6
    for f in files:
        with open(f, "rb") as fh:
            h = read_header(fh)
        assert h.layout.endswith("|kvq-int8-g64-v1") and h.nbytes < raw_block / 3
