"""Compare what kvplug relies on in vLLM between the installed vLLM and another release's wheel,
reading the wheel's sources without installing it.

    python tools/vllm_compare.py [--version 0.33.0] [--wheel PATH] [--out tools/vllm_compare]

Without --wheel, `pip download --no-deps vllm==VERSION` fetches the wheel (from PyPI) into a
temporary folder. Every item below is something kvplug's connector touches: the KV connector
interface (the base class's methods, the metadata, stats and handshake classes, what the
scheduler hands it) and every vLLM internal kvplug/connector/vllm_compat.py reads (runners,
config fields, the KV cache spec, parallel state, attention backend, rotary embeddings, the
decoder layers of the supported families, the hooks kvplug depends on being called). For each,
the script extracts facts from both sources with `ast` (class names and bases, signatures:
parameter names, kinds and defaults; dataclass fields; enum values; whether a call is made) and
writes them, side by side, to OUT/<old>-<new>.json and a table of what differs to
OUT/<old>-<new>.md: facts about the sources, never the sources themselves.
A signature counts as the same when its parameter names, kinds and defaults match; annotation
changes alone are listed apart (they do not change a call).
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
# (what kvplug uses it for, file, kind, name). Kinds: class, methods (every method of a class),
# method (Class.name), function, fields (annotated class attributes and properties), enum,
# assign (a module-level value), calls (the file calls these names), self_attrs (Class.method
# assigns these self.<attr>), module_attr (a module-level name exists).
ITEMS = [
    ("connector interface", BASE, "class", "KVConnectorBase_V1"),
    ("connector interface", BASE, "methods", "KVConnectorBase_V1"),
    ("connector interface", BASE, "enum", "KVConnectorRole"),
    ("connector interface", BASE, "class", "KVConnectorMetadata"),
    ("connector interface", BASE, "class", "KVConnectorWorkerMetadata"),
    ("connector interface", BASE, "methods", "KVConnectorWorkerMetadata"),
    ("connector interface", BASE, "class", "KVConnectorHandshakeMetadata"),
    ("connector interface", "vllm/distributed/kv_transfer/kv_connector/v1/metrics.py", "methods", "KVConnectorStats"),
    ("connector interface", "vllm/distributed/kv_transfer/kv_connector/v1/metrics.py", "methods",
     "KVConnectorPromMetrics"),
    ("scheduler output", "vllm/v1/core/sched/output.py", "fields", "SchedulerOutput"),
    ("scheduler output", "vllm/v1/core/sched/output.py", "fields", "NewRequestData"),
    ("scheduler output", "vllm/v1/core/sched/output.py", "fields", "CachedRequestData"),
    ("request", "vllm/v1/request.py", "self_attrs", "Request.__init__:request_id,prompt_token_ids,cache_salt,"
     "kv_transfer_params"),
    ("connector output", "vllm/v1/outputs.py", "fields", "KVConnectorOutput"),
    ("handshake at start-up", "vllm/v1/engine/core.py", "calls",
     "get_kv_connector_handshake_metadata,set_xfer_handshake_metadata_pp_aware"),
    ("handshake at start-up", "vllm/v1/worker/gpu_worker.py", "calls", "get_handshake_metadata"),
    ("config hook (early validation)", "vllm/config/vllm.py", "calls", "requires_piecewise_for_cudagraph"),
    ("registration", "vllm/distributed/kv_transfer/kv_connector/factory.py", "methods", "KVConnectorFactory"),
    ("registration", "vllm/distributed/kv_transfer/kv_connector/factory.py", "fields", "KVConnectorFactory"),
    ("model capture", "vllm/v1/worker/gpu_model_runner.py", "method", "GPUModelRunner.load_model"),
    ("model capture", "vllm/v1/worker/gpu_model_runner.py", "self_attrs", "GPUModelRunner.__init__:vllm_config,model"),
    ("model capture", "vllm/v1/worker/cpu_model_runner.py", "method", "CPUModelRunner.load_model"),
    ("engine config", "vllm/config/kv_transfer.py", "fields", "KVTransferConfig"),
    ("engine config", "vllm/config/model.py", "fields", "ModelConfig"),
    ("engine config", "vllm/config/parallel.py", "fields", "ParallelConfig"),
    ("engine config", "vllm/config/cache.py", "fields", "CacheConfig"),
    ("engine config", "vllm/config/compilation.py", "fields", "CompilationConfig"),
    ("KV cache spec", "vllm/v1/kv_cache_interface.py", "function", "group_kernel_blocks"),
    ("KV cache spec", "vllm/v1/kv_cache_interface.py", "fields", "AttentionSpec"),
    ("KV cache spec", "vllm/v1/kv_cache_interface.py", "fields", "KVCacheSpec"),
    ("KV cache spec", "vllm/v1/kv_cache_interface.py", "fields", "KVCacheConfig"),
    ("KV cache spec", "vllm/v1/kv_cache_interface.py", "fields", "KVCacheGroupSpec"),
    ("platform", "vllm/platforms/__init__.py", "module_attr", "current_platform"),
    ("offline engine (kvplug warm)", "vllm/__init__.py", "module_attr", "LLM"),
    ("offline engine (kvplug warm)", "vllm/__init__.py", "module_attr", "SamplingParams"),
    ("sleep mode", "vllm/config/vllm.py", "calls", "supports_sleep_mode"),
    ("parallel state", "vllm/distributed/parallel_state.py", "function", "get_tensor_model_parallel_rank"),
    ("CPU attention", "vllm/_custom_ops.py", "function", "cpu_attn_get_scheduler_metadata"),
    ("CPU attention", "vllm/envs.py", "module_attr", "VLLM_CPU_ATTN_SPLIT_KV"),
    ("CPU attention", "vllm/v1/attention/backends/cpu_attn.py", "fields", "CPUAttentionMetadata"),
    ("CPU attention", "vllm/v1/attention/backends/cpu_attn.py", "method", "CPUAttentionBackendImpl.forward"),
    ("CPU attention", "vllm/v1/attention/backends/cpu_attn.py", "method", "CPUAttentionBackendImpl.do_kv_cache_update"),
    ("CPU attention", "vllm/v1/attention/backends/cpu_attn.py", "self_attrs",
     "CPUAttentionBackendImpl.__init__:kv_cache_dtype,sliding_window,logits_soft_cap,alibi_slopes"),
    ("attention module", "vllm/model_executor/layers/attention/attention.py", "class", "Attention"),
    ("attention module", "vllm/model_executor/layers/attention/attention.py", "self_attrs",
     "Attention.__init__:impl,layer_name"),
    ("rotary embedding", "vllm/model_executor/layers/rotary_embedding/base.py", "class", "RotaryEmbedding"),
    ("rotary embedding", "vllm/model_executor/layers/rotary_embedding/base.py", "method",
     "RotaryEmbeddingBase._compute_inv_freq"),
    ("rotary embedding", "vllm/model_executor/layers/rotary_embedding/base.py", "self_attrs",
     "RotaryEmbeddingBase.__init__:rotary_dim,base,is_neox_style"),
    ("rotary embedding", "vllm/model_executor/layers/rotary_embedding/llama3_rope.py", "class", "Llama3RotaryEmbedding"),
    ("rotary embedding", "vllm/model_executor/layers/rotary_embedding/linear_scaling_rope.py", "class",
     "LinearScalingRotaryEmbedding"),
    ("decoder layers", "vllm/model_executor/models/llama.py", "class", "LlamaForCausalLM"),
    ("decoder layers", "vllm/model_executor/models/llama.py", "method", "LlamaDecoderLayer.forward"),
    ("decoder layers", "vllm/model_executor/models/llama.py", "self_attrs",
     "LlamaAttention.__init__:num_heads,num_kv_heads,head_dim,scaling,rotary_emb,attn"),
    ("decoder layers", "vllm/model_executor/models/llama.py", "self_attrs",
     "LlamaModel.__init__:embed_tokens,start_layer,end_layer,layers"),
    ("decoder layers", "vllm/model_executor/models/mistral.py", "class", "MistralForCausalLM"),
    ("decoder layers", "vllm/model_executor/models/mistral.py", "method", "MistralDecoderLayer.forward"),
    ("decoder layers", "vllm/model_executor/models/qwen2.py", "class", "Qwen2ForCausalLM"),
    ("decoder layers", "vllm/model_executor/models/qwen2.py", "method", "Qwen2DecoderLayer.forward"),
    ("decoder layers", "vllm/model_executor/models/qwen2.py", "self_attrs",
     "Qwen2Attention.__init__:num_heads,num_kv_heads,head_dim,scaling,rotary_emb,attn"),
    ("CUDA KV layouts (kvplug/ops/kv_layout.py)", "vllm/v1/kv_cache_layout.py", "enum", "KVCacheLayout"),
    ("CUDA KV layouts (kvplug/ops/kv_layout.py)", "vllm/v1/attention/backends/utils.py", "assign",
     "_FLASHINFER_LAYOUT_NAMES"),
    ("CUDA KV layouts (kvplug/ops/kv_layout.py)", "vllm/v1/attention/backends/utils.py", "assign",
     "_DEFAULT_LAYOUT_PREFERENCE"),
]


# ---- facts from one source ---------------------------------------------------------------------
def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def _signature(fn: ast.FunctionDef) -> dict:
    a = fn.args
    params = [(p.arg, "posonly") for p in a.posonlyargs] + [(p.arg, "pos") for p in a.args]
    params += [(a.vararg.arg, "*")] if a.vararg else []
    params += [(p.arg, "kwonly") for p in a.kwonlyargs] + ([(a.kwarg.arg, "**")] if a.kwarg else [])
    defaults = [ast.unparse(d) for d in a.defaults] + [ast.unparse(d) if d else None for d in a.kw_defaults]
    decorators = sorted(ast.unparse(d) for d in fn.decorator_list)
    return {"shape": f"{[p for p in params]} defaults={defaults} decorators={decorators}",
            "text": f"({ast.unparse(a)})" + (f" -> {ast.unparse(fn.returns)}" if fn.returns else "")}


def _methods(cls: ast.ClassDef) -> dict[str, dict]:
    return {n.name: _signature(n) for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _fields(cls: ast.ClassDef) -> dict[str, dict]:
    out = {}
    for n in cls.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            out[n.target.id] = {"shape": "field", "text": ast.unparse(n.annotation)}
        elif isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = {"shape": "class attribute", "text": ""}
        elif isinstance(n, ast.FunctionDef) and any(ast.unparse(d) in ("property", "cached_property", "functools.cached_property")
                                                      for d in n.decorator_list):
            out[n.name] = {"shape": "property", "text": ""}
    return out


def _self_attrs(fn: ast.FunctionDef, wanted: list[str]) -> dict[str, dict]:
    found = {t.attr for n in ast.walk(fn) for t in (n.targets if isinstance(n, ast.Assign) else
                                                   [n.target] if isinstance(n, (ast.AnnAssign, ast.AugAssign)) else [])
             if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return {w: {"shape": "assigned" if w in found else "absent", "text": ""} for w in wanted}


def fact(source: str | None, kind: str, name: str):
    """The facts of one item in one source, or {"missing": why}."""
    if source is None:
        return {"missing": "file absent"}
    tree = ast.parse(source)
    classes = _classes(tree)
    if kind in ("class", "methods", "fields", "enum"):
        cls = classes.get(name)
        if cls is None:
            return {"missing": f"no class {name}"}
        if kind == "class":
            return {"bases": {"shape": str([ast.unparse(b) for b in cls.bases]), "text": ""}}
        if kind == "methods":
            return _methods(cls)
        if kind == "fields":
            return _fields(cls)
        return {t.id: {"shape": ast.unparse(n.value), "text": ""} for n in cls.body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    if kind in ("method", "self_attrs"):
        target, _, wanted = name.partition(":")
        cls_name, meth = target.split(".")
        cls = classes.get(cls_name)
        fn = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == meth), None) if cls else None
        if fn is None:
            return {"missing": f"no {target}"}
        return {meth: _signature(fn)} if kind == "method" else _self_attrs(fn, wanted.split(","))
    if kind == "function":
        fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
        return {name: _signature(fn)} if fn else {"missing": f"no function {name}"}
    if kind == "assign":
        for n in tree.body:
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return {name: {"shape": ast.unparse(n.value), "text": ""}}
        return {"missing": f"no {name}"}
    if kind == "calls":
        called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                  for n in ast.walk(tree) if isinstance(n, ast.Call)}
        return {c: {"shape": "called" if c in called else "not called", "text": ""} for c in name.split(",")}
    if kind == "module_attr":
        names = {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                 for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        text = source
        present = name in names or f'"{name}"' in text  # vllm/envs.py declares its variables as dict keys
        return {name: {"shape": "present" if present else "absent", "text": ""}}
    raise ValueError(f"kind {kind!r}")


# ---- two sources side by side ------------------------------------------------------------------
def compare(old_read, new_read) -> list[dict]:
    rows = []
    for what, path, kind, name in ITEMS:
        a, b = fact(old_read(path), kind, name), fact(new_read(path), kind, name)
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            same = x is not None and y is not None and x.get("shape") == y.get("shape") if key != "missing" else x == y
            rows.append({"what": what, "file": path, "kind": kind, "item": name, "key": key,
                         "old": x, "new": y, "same": bool(same),
                         "annotations_only": bool(same and x and y and x.get("text") != y.get("text"))})
    return rows


def wheel_reader(wheel: Path):
    z = zipfile.ZipFile(wheel)
    names = set(z.namelist())
    return lambda path: z.read(path).decode() if path in names else None


def installed_reader():
    import vllm

    root = Path(vllm.__file__).resolve().parents[1]
    return lambda path: (root / path).read_text() if (root / path).exists() else None, vllm.__version__


def download(version: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"vllm=={version}", "-d", str(into)],
                   check=True, capture_output=True)
    (wheel,) = into.glob(f"vllm-{version}-*.whl")
    return wheel


def report(rows: list[dict], old: str, new: str) -> str:
    differ = [r for r in rows if not r["same"]]
    notes = [r for r in rows if r["annotations_only"]]
    lines = [f"# vLLM {old} -> {new}: what kvplug relies on", "",
             f"Generated by `python tools/vllm_compare.py --version {new}` from the installed vLLM {old} and the "
             f"{new} wheel's sources (not installed). {len(rows)} facts compared, {len(differ)} differ, "
             f"{len(notes)} differ in annotations only.", "", "## Differences", "",
             "| used for | item | fact | {} | {} |".format(old, new), "|---|---|---|---|---|"]
    for r in differ:
        lines.append(f"| {r['what']} | `{r['item']}` | `{r['key']}` | {_cell(r['old'])} | {_cell(r['new'])} |")
    if not differ:
        lines.append("| (none) | | | | |")
    lines += ["", "## Annotation-only changes (same parameters)", ""]
    lines += [f"- `{r['item']}` `{r['key']}`" for r in notes] or ["- (none)"]
    return "\n".join(lines) + "\n"


def _cell(x) -> str:
    if x is None:
        return "absent"
    if "missing" in x:
        return x["missing"] if isinstance(x, dict) and len(x) == 1 else str(x)
    return str(x.get("shape", x)).replace("|", "\\|")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default="0.33.0")
    p.add_argument("--wheel", type=Path, default=None, help="the wheel (default: pip download it)")
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "vllm_compare")
    a = p.parse_args(argv)
    old_read, old = installed_reader()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = a.wheel or download(a.version, Path(tmp))
        rows = compare(old_read, wheel_reader(wheel))
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"{old}-{a.version}"
    (a.out / f"{stem}.json").write_text(json.dumps({"old": old, "new": a.version, "facts": rows}, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(report(rows, old, a.version))
    differ = sum(not r["same"] for r in rows)
    print(f"{len(rows)} facts, {differ} differ: {a.out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
