"""A bad kv_connector_extra_config fails vLLM's start-up before any weight is loaded (the
connector itself is built only after the model is in: kvplug checks its config first, from the
plugin's hook on the model runner's load_model). The oracle is vLLM's own log line for loaded
weights, which a good config's start-up prints (tests/e2e/test_offload_e2e.py runs those)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_offload_e2e import DRIVER, ENV  # noqa: E402
from tiny_model import tiny_model_path  # noqa: E402

pytestmark = pytest.mark.e2e
WEIGHTS_LOADED = "Loading weights took"  # vllm/model_executor/model_loader/default_loader.py


def start(tmp_path: Path, extra: dict) -> tuple[int, str]:
    spec, log = tmp_path / "spec.json", tmp_path / "engine.log"
    spec.write_text(json.dumps({"model": str(tiny_model_path()), "extra": extra, "steps": [{"prompts": ["hi"]}]}))
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(DRIVER), str(spec), str(tmp_path / "out.json")],
                              stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=600)
    return proc.returncode, log.read_text()


def test_a_bad_key_fails_start_up_before_any_weight_is_loaded(tmp_path):
    code, log = start(tmp_path, {"cpu_bytes": 1e8, "eviction_policy": "mru"})
    assert code != 0, log[-3000:]
    assert "eviction_policy='mru': allowed values are" in log, log[-3000:]
    assert WEIGHTS_LOADED not in log, log[-3000:]
