"""kvplug's counters, the audit histogram and the guard's gauge through vLLM's stats plumbing:
aggregated across steps and ranks as vLLM does, and observed into Prometheus metrics."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvplug.connector.stats import KVPlugPromMetrics, KVPlugStats


class _Registry:
    """prometheus_client metric classes bound to a private registry (vLLM passes its own)."""

    def __init__(self):
        self.registry = CollectorRegistry()

        def bind(cls):
            def make(*a, **k):
                k.pop("multiprocess_mode", None)
                return cls(*a, registry=self.registry, **k)
            return make
        self.types = {Counter: bind(Counter), Gauge: bind(Gauge), Histogram: bind(Histogram)}

    def value(self, name, **labels):
        return self.registry.get_sample_value(name, labels)


def test_counters_sum_gauges_keep_the_latest_and_audits_concatenate():
    a = KVPlugStats.new(audits=[("", 0.02, True)], gauges={"blend_guard_ratio": 0.15}, blend_requests=2)
    b = KVPlugStats.new(audits=[("team-a", 0.5, False)], gauges={"blend_guard_ratio": 0.3}, blend_requests=1)
    m = a.aggregate(b)
    assert m.data["blend_requests"] == 3 and m.data["blend_guard_ratio"] == 0.3
    assert m.data["blend_audit"] == [["", 0.02, True], ["team-a", 0.5, False]]
    r = m.reduce()
    assert r["blend_audits"] == 2 and r["blend_audit_top1"] == 0.5 and abs(r["blend_audit_kl_mean"] - 0.26) < 1e-9


def test_audits_reach_prometheus_as_a_histogram_and_counters_per_tenant():
    reg = _Registry()
    config = type("VllmConfig", (), {"kv_transfer_config": None})()
    prom = KVPlugPromMetrics(config, reg.types, ["model_name", "engine"], {0: ["m", "0"]})
    data = KVPlugStats.new(audits=[("team-a", 0.02, True), ("team-a", 2.0, False), ("", 0.001, True)],
                           gauges={"blend_guard_ratio": 0.3}, blend_requests=3).data
    prom.observe(data, 0)
    labels = {"model_name": "m", "engine": "0"}
    assert reg.value("vllm:kvplug_blend_audits_total", **labels, tenant="team-a") == 2
    assert reg.value("vllm:kvplug_blend_audit_top1_agree_total", **labels, tenant="team-a") == 1
    assert reg.value("vllm:kvplug_blend_audit_kl_count", **labels, tenant="") == 1
    assert reg.value("vllm:kvplug_blend_audit_kl_bucket", **labels, tenant="team-a", le="0.03") == 1
    assert reg.value("vllm:kvplug_blend_guard_ratio", **labels) == 0.3
    assert reg.value("vllm:kvplug_blend_requests_total", **labels) == 3
