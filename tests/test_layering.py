"""The layering rule: only kvplug.connector imports vLLM, only kvplug.sglang imports SGLang; within
the connector, every vLLM module but the KV connector interface is imported by vllm_compat.py only
and no other module reads vLLM's internal attributes (every import parsed, inside functions too);
our Triton folder never shadows the real `triton_kernels` package."""
import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import kvplug

ROOT = Path(__file__).resolve().parents[1]


def _modules(skip: tuple[str, ...]) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(kvplug.__path__, "kvplug.")
            if not any(f".{s}" in m.name for s in skip)]


def _import_blocking(mods: list[str], blocked: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked)
        + "import importlib\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_nothing_but_connector_imports_vllm():
    # kvplug.sglang imports SGLang, which may be absent here; with it installed it is checked too.
    skip = ("connector",) if importlib.util.find_spec("sglang") else ("connector", "sglang")
    out = _import_blocking(_modules(skip), ["vllm"])
    assert out.returncode == 0, out.stderr[-2000:]


def test_nothing_but_kvplug_sglang_imports_sglang():
    out = _import_blocking(_modules(("connector", "sglang")), ["vllm", "sglang"])
    assert out.returncode == 0, out.stderr[-2000:]
    # kvplug.sglang's own helper modules (all but backend) do not need SGLang either.
    helpers = [m for m in _modules(("connector",)) if m.startswith("kvplug.sglang") and m != "kvplug.sglang.backend"]
    out = _import_blocking(helpers, ["vllm", "sglang"])
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_connector_does_not_import_sglang():
    out = _import_blocking([m for m in _modules(("sglang",)) if ".connector" in m], ["sglang"])
    assert out.returncode == 0, out.stderr[-2000:]


def test_our_triton_folder_installs_as_kvplug_triton_only():
    # Run from the repository root, where the folder is on sys.path: the import must either
    # find Triton's real package or fail, never hand vLLM our kernels under that name.
    code = "import triton_kernels, pathlib; print(pathlib.Path(triton_kernels.__file__).resolve())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode == 0:
        assert not out.stdout.strip().startswith(str(ROOT / "triton_kernels")), out.stdout
    else:
        assert "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr, out.stderr[-500:]
    ours = importlib.import_module("kvplug._triton")
    assert Path(ours.__file__).resolve().parent == ROOT / "triton_kernels"


# ---- every vLLM internal in vllm_compat.py ------------------------------------------------------
# The KV connector interface is vLLM's public plugin API: these names, from these modules, may be
# imported by any kvplug.connector module. Every other vLLM module is imported by vllm_compat.py only.
PUBLIC_VLLM = {
    "vllm.distributed.kv_transfer.kv_connector.v1.base": {
        "KVConnectorBase_V1", "KVConnectorRole", "KVConnectorMetadata", "KVConnectorWorkerMetadata",
        "KVConnectorHandshakeMetadata"},
    "vllm.distributed.kv_transfer.kv_connector.v1.metrics": {"KVConnectorStats", "KVConnectorPromMetrics"},
}
COMPAT = ROOT / "kvplug" / "connector" / "vllm_compat.py"
# Attributes of vLLM's objects that are not the connector interface: the engine's config objects,
# the KV cache spec, the platform, parallel state, the connector factory, the model's layers, its
# attention modules and backends, rotary embeddings. Read only in vllm_compat.py.
INTERNAL_ATTRS = {
    "self_attn", "rotary_emb", "impl", "_modules", "kv_load_failure_policy", "current_platform",
    "static_forward_context", "kv_cache_groups", "kv_cache_spec", "page_size_bytes", "do_kv_cache_update",
    "embed_input_ids", "embed_tokens", "start_layer", "end_layer", "ada_rms_norm_t_cond", "sliding_window",
    "logits_soft_cap", "alibi_slopes", "_compute_inv_freq", "is_neox_style", "rotary_dim", "parallel_config",
    "model_config", "cache_config", "compilation_config", "kv_transfer_config", "kv_connector_extra_config",
    "is_kv_consumer", "is_kv_producer", "pipeline_parallel_size", "tensor_parallel_size", "layer_name", "isa",
    "scaling", "kv_cache_dtype", "cache_dtype", "_registry", "rank_in_group",
}


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / "kvplug" / f).rglob("*.py"))


def _vllm_imports(tree: ast.AST) -> list[tuple[int, str, set[str]]]:
    """(line, module, names) of every import of vLLM anywhere in the file (inside functions too),
    including __import__ / importlib.import_module of a constant "vllm..." name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, set()) for a in node.names if a.name.split(".")[0] == "vllm"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            out.append((node.lineno, node.module, {a.name for a in node.names}))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("vllm."):
            out.append((node.lineno, node.value, {"(a module name)"}))
    return out


def _internal_attrs(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS:
            out.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1 and \
                isinstance(node.args[1], ast.Constant) and node.args[1].value in INTERNAL_ATTRS:
            out.append((node.lineno, node.args[1].value))
    return out


def test_vllm_is_imported_by_vllm_compat_and_the_connector_interface_only():
    bad = []
    for path in _sources("."):
        if path == COMPAT:
            continue
        for line, module, names in _vllm_imports(ast.parse(path.read_text())):
            public = path.parent.name == "connector" and module in PUBLIC_VLLM and names <= PUBLIC_VLLM[module]
            if not public:
                bad.append(f"{path.relative_to(ROOT)}:{line} {module} {sorted(names)}")
    assert not bad, "vLLM reached outside kvplug/connector/vllm_compat.py:\n" + "\n".join(bad)


def test_no_vllm_internal_attribute_is_read_outside_vllm_compat():
    # vLLM's objects can only reach the modules that import from kvplug.connector (the rest of
    # kvplug cannot import vLLM, checked above): the connector package and the command line.
    bad = []
    for path in _sources("connector", "cli"):
        if path != COMPAT:
            bad += [f"{path.relative_to(ROOT)}:{line} .{name}" for line, name in _internal_attrs(ast.parse(path.read_text()))]
    assert not bad, "vLLM internals read outside kvplug/connector/vllm_compat.py:\n" + "\n".join(bad)


def test_the_scans_see_what_they_look_for():
    # The two checks above on a file that does what they forbid: an import inside a function, a
    # module name handed to __import__, an internal attribute read and a getattr of one.
    tree = ast.parse("def f(m):\n    from vllm import LLM\n    __import__('vllm.platforms')\n"
                     "    return m.self_attn, getattr(m, 'impl')\n")
    assert [(m, n) for _, m, n in _vllm_imports(tree)] == [("vllm", {"LLM"}), ("vllm.platforms", {"(a module name)"})]
    assert sorted(n for _, n in _internal_attrs(tree)) == ["impl", "self_attn"]
