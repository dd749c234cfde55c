"""`kvplug warm`: prefill documents through an offline vLLM engine so their KV lands on disk.

    find_documents(docs_dir, pattern) -> list[Path]    the files to warm, sorted; CliError if none
    warm(args) -> WarmResult                           start the engine, prefill, wait for the disk
    report(result) -> str                              the table and summary line printed

vLLM and torch are imported inside warm() only (the engine through kvplug's vllm_compat, the one
module that reaches vLLM's objects), so `kvplug --help` and `kvplug stats` stay fast.
A later query hits when it *begins* with a document's exact text: the disk tier stores whole
KV blocks of prompt prefixes (keys chain over all tokens before them), so only full blocks of
the document before the first token that differs are reusable.

With --blend each document is also stored as a blend chunk (in DISK_PATH/chunks), in both
forms a prompt can hold it: first in the prompt, and after a chunk separator. Engines started
with blend on then reuse it at any position. The prompt sent is `DOC SEP DOC SEP .`, whose two
chunks are exactly those two forms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kvplug.cli.cache_dir import count_tmp, count_units
from kvplug.cli.common import CliError, format_table

COUNTER_PREFIX = "vllm:kvplug_"
HIT_SUFFIX = "_hit_tokens"  # <tier>_hit_tokens, one counter per tier (cpu and every configured one)


@dataclass
class DocResult:
    name: str
    tokens: int = 0
    stored_blocks: int = 0  # blocks newly saved by this prefill
    stored_chunks: int = 0  # blend chunks computed and stored (--blend)
    cached_tokens: int = 0  # tokens already held by a kvplug tier (nothing to do for them)
    skipped: str = ""  # why nothing was done, if so


@dataclass
class WarmResult:
    disk_path: str
    docs: list[DocResult] = field(default_factory=list)
    units_before: int = 0
    units_after: int = 0
    wait_s: float = 0.0
    settled: bool = True  # every expected unit file appeared before the wait timed out

    @property
    def stored_blocks(self) -> int:
        return sum(d.stored_blocks for d in self.docs)

    @property
    def stored_chunks(self) -> int:
        return sum(d.stored_chunks for d in self.docs)

    @property
    def expected_files(self) -> int:
        """Unit files (prefix blocks and chunks share the tier) once every write of this run has landed."""
        return self.units_before + self.stored_blocks + self.stored_chunks


def find_documents(docs_dir: str, pattern: str = "*.txt") -> list[Path]:
    root = Path(docs_dir)
    if not root.is_dir():
        raise CliError(f"{docs_dir}: no such directory; give a folder of {pattern} documents")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise CliError(f"{docs_dir} holds no {pattern} files; put one document per file there")
    return files


def _check_model(model: str) -> None:
    # "org/name" may be a hub id: only paths that cannot be one are checked here.
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise CliError(f"--model {model}: no such directory; give a local model folder")


def _counters(llm) -> dict[str, float]:
    return {m.name[len(COUNTER_PREFIX):]: m.value for m in llm.get_metrics()
            if m.name.startswith(COUNTER_PREFIX) and hasattr(m, "value")}


def _engine(args):
    from kvplug.connector.vllm_compat import offline_engine  # heavy: only here

    extra = {"cpu_bytes": int(args.cpu_bytes), "disk_path": str(args.disk_path),
             "disk_bytes": int(args.disk_bytes)}
    if args.blend:
        extra.update(blend=True, chunk_separator=args.chunk_separator)
    kwargs = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    return offline_engine(model=args.model, enforce_eager=not args.cuda_graphs, dtype=args.dtype,
                          disable_log_stats=False, kv_transfer_config={
                              "kv_connector": "KVPlugConnector", "kv_role": "kv_both",
                              "kv_connector_extra_config": extra}, **kwargs)


def _prefill(llm, sp, path: Path, separator: str | None) -> DocResult:
    res = DocResult(name=path.name)
    text = path.read_text(errors="replace")
    if not text.strip():
        res.skipped = "empty"
        return res
    res.tokens = len(llm.get_tokenizer().encode(text))
    before = _counters(llm)
    prompt = text if separator is None else f"{text}{separator}{text}{separator}."
    try:
        llm.generate([prompt], sp, use_tqdm=False)
    except ValueError as e:  # e.g. longer than max_model_len: vLLM rejects the prompt
        res.skipped = str(e).splitlines()[0][:120]
        return res
    after = _counters(llm)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    res.stored_blocks = int(delta.get("saved_blocks", 0))
    res.stored_chunks = int(delta.get("saved_chunks", 0))
    res.cached_tokens = int(sum(v for k, v in delta.items() if k.endswith(HIT_SUFFIX)))
    return res


def _wait_for_disk(result: WarmResult, timeout_s: float, quiet_s: float = 3.0) -> None:
    """The connector writes files from a background thread: wait until the expected number is
    there, or until nothing is in flight and the count stopped moving (evictions, drops)."""
    expected = result.expected_files
    t0 = last_change = time.monotonic()
    last = count_units(result.disk_path)
    while last < expected and time.monotonic() - t0 < timeout_s:
        time.sleep(0.2)
        now = count_units(result.disk_path)
        if now != last or count_tmp(result.disk_path):
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
    result.wait_s = time.monotonic() - t0
    result.units_after = count_units(result.disk_path)
    result.settled = last >= expected


def warm(args) -> WarmResult:
    files = find_documents(args.docs_dir, args.pattern)
    _check_model(args.model)
    from kvplug.connector.vllm_compat import greedy

    result = WarmResult(disk_path=str(args.disk_path), units_before=count_units(args.disk_path))
    llm = _engine(args)
    sp = greedy(max_tokens=1)
    for path in files:
        result.docs.append(_prefill(llm, sp, path, args.chunk_separator if args.blend else None))
    _wait_for_disk(result, args.wait_s)
    return result


def report(r: WarmResult) -> str:
    rows = [{"document": d.name, "tokens": d.tokens, "stored_blocks": d.stored_blocks,
             "already_cached_tokens": d.cached_tokens, "note": d.skipped} for d in r.docs]
    done = sum(1 for d in r.docs if not d.skipped)
    lines = [format_table(rows, ["document", "tokens", "stored_blocks", "already_cached_tokens", "note"]),
             f"kvplug warm: {done} documents prefilled, {r.stored_blocks} blocks stored; unit files in "
             f"{r.disk_path}: {r.units_before} -> {r.units_after}"]
    if r.stored_chunks:
        lines.append(f"blend chunks: {r.stored_chunks} stored (unit files of the same disk tier)")
    if not r.settled:
        lines.append(f"warning: expected {r.expected_files} unit files after "
                     f"{r.wait_s:.0f} s; disk_bytes may be too small (evictions) or writes failed "
                     "(see the engine log)")
    return "\n".join(lines)
