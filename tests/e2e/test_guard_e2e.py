"""End to end over `vllm serve`: the blend quality guard's metrics reach Prometheus (/metrics).

Every blend is audited (blend_audit_rate 1.0) at recompute ratio 0, where the blended KV differs
from an exact prefill on this context-dependent tiny model, so the audited KL is above zero; with
blend_max_kl set far below it, the guard must raise its recompute-ratio floor after each window of
three audits. Requests carry a cache_salt that is a configured namespace, so the histogram and
counters are labelled with that tenant. The oracle for "blended" is kvplug's own blend counters.
"""
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_blend_chat_e2e import document  # noqa: E402
from test_offload_e2e import model, served_counter, vllm_serve  # noqa: E402,F401

pytestmark = pytest.mark.e2e
SEP = " # # "
TENANT = "tenant-a"
EXTRA = {"cpu_bytes": 1e8, "blend": True, "blend_cost_gate": False, "recompute_ratio": 0.0,
         "blend_min_chunk_tokens": 8, "blend_audit_rate": 1.0, "blend_max_kl": 1e-9,
         "namespaces": {TENANT: {"cpu_bytes": 5e7}}}


def prompt(order: list[int], docs: list[str]) -> str:
    return SEP.join(["Answer from the documents.", *(docs[i] for i in order), "Which document is first?"])


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_audits_reach_metrics_by_tenant_and_the_guard_raises_its_floor(model, tmp_path):
    import requests
    from openai import OpenAI

    docs = [document(s, 5) for s in range(4)]
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 2, 1], [1, 0, 3, 2], [2, 3, 0, 1]]
    kv = {"kv_connector": "KVPlugConnector", "kv_role": "kv_both", "kv_connector_extra_config": EXTRA}
    with vllm_serve(model, tmp_path / "kvplug.log", kv) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        for order in orders:
            client.completions.create(model=model, prompt=prompt(order, docs), max_tokens=2, temperature=0,
                                      extra_body={"cache_salt": TENANT})
        deadline = time.time() + 30
        while served_counter(url, "blend_requests") < len(orders) - 1 and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # the last step's stats
        text = requests.get(f"{url}/metrics", timeout=10).text
        blends = served_counter(url, "blend_requests")
    audits = metric(text, "vllm:kvplug_blend_audits_total", tenant=TENANT)
    assert blends >= 3 and audits == blends  # every blend audited, labelled with its tenant
    assert metric(text, "vllm:kvplug_blend_audit_kl_count", tenant=TENANT) == audits
    assert metric(text, "vllm:kvplug_blend_audit_kl_sum", tenant=TENANT) > 0  # ratio 0 is not exact here
    assert 0 <= metric(text, "vllm:kvplug_blend_audit_top1_agree_total", tenant=TENANT) <= audits
    # one step per full window of three audits above blend_max_kl: 0.15 after three, 0.3 after six
    assert metric(text, "vllm:kvplug_blend_guard_ratio") >= 0.15
