"""Workload generators (benchmarks/workloads): determinism per seed, sizes, Zipf skew, chat
history growth, separators, and the JSONL command line."""
import collections
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import workloads  # noqa: E402
from benchmarks.workloads import SEPARATOR, Request, rag, text  # noqa: E402


def run_cli(tmp_path: Path, name: str, *args: str) -> bytes:
    out = tmp_path / f"{name}.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.workloads", *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


@pytest.mark.parametrize("kind,args", [("rag", ["--n", "30", "--docs", "20"]),
                                       ("chat", ["--sessions", "3", "--rounds", "4"]),
                                       ("longdoc", ["--docs", "2", "--questions", "3", "--doc-tokens", "300"])])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, kind, args):
    a = run_cli(tmp_path, "a", "--kind", kind, "--seed", "0", *args)
    b = run_cli(tmp_path, "b", "--kind", kind, "--seed", "0", *args)
    c = run_cli(tmp_path, "c", "--kind", kind, "--seed", "1", *args)
    assert a == b
    assert a != c
    assert len(a.splitlines()) == len(c.splitlines()) > 0


def test_jsonl_round_trip(tmp_path):
    reqs = workloads.generate("rag", n=5, n_docs=10, seed=3)
    workloads.write_jsonl(reqs, tmp_path / "r.jsonl")
    assert workloads.read_jsonl(tmp_path / "r.jsonl") == reqs
    assert all(isinstance(r, Request) and isinstance(r.doc_ids, tuple) for r in reqs)


def test_rag_k_distinct_docs_separators_and_question():
    reqs = rag.generate(n=200, n_docs=30, chunk_tokens=64, seed=0, max_tokens=7)
    ks = collections.Counter(len(r.doc_ids) for r in reqs)
    assert set(ks) <= set(range(4, 9)) and len(ks) >= 4  # k spans [4, 8]
    docs = text.make_documents(30, 64, seed=0)
    for r in reqs:
        assert len(set(r.doc_ids)) == len(r.doc_ids)
        parts = r.prompt.split(SEPARATOR)
        assert len(parts) == len(r.doc_ids) + 1  # chunks, then the question
        assert parts[:-1] == [docs[d] for d in r.doc_ids]  # prompt order == doc_ids order
        assert parts[-1].startswith("Question: ")
        assert r.max_tokens == 7
    # Retrieval order is shuffled, not popularity order: popular docs are not always first.
    assert len({r.doc_ids[0] for r in reqs}) > 5


def test_rag_zipf_skew_visible_in_counts():
    reqs = rag.generate(n=400, n_docs=40, chunk_tokens=32, zipf_s=1.2, seed=0)
    counts = collections.Counter(d for r in reqs for d in r.doc_ids)
    head = sum(counts[d] for d in range(4))
    tail = sum(counts[d] for d in range(36, 40))
    assert head > 3 * tail
    assert counts[0] >= counts[20]
    uniform = rag.generate(n=400, n_docs=40, chunk_tokens=32, zipf_s=0.0, seed=0)
    ucounts = collections.Counter(d for r in uniform for d in r.doc_ids)
    assert max(ucounts.values()) < 3 * min(ucounts.values())


def test_rag_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="k_max=8 > n_docs=5"):
        rag.generate(n=1, n_docs=5)
    with pytest.raises(ValueError, match="k_min"):
        rag.generate(n=1, n_docs=10, k_min=6, k_max=5)
    with pytest.raises(ValueError, match="allowed values"):
        workloads.generate("nope")


def test_rag_sessions_group_queries():
    reqs = rag.generate(n=7, n_docs=10, chunk_tokens=16, queries_per_session=3, seed=0)
    assert [(r.session, r.round) for r in reqs][:4] == [("rag-0", 0), ("rag-0", 1), ("rag-0", 2), ("rag-1", 0)]


def test_chat_history_grows_monotonically():
    reqs = workloads.generate("chat", n_sessions=3, rounds=5, seed=0)
    assert len(reqs) == 15
    by_session = collections.defaultdict(list)
    for r in reqs:
        by_session[r.session].append(r)
    for session in by_session.values():
        assert [r.round for r in session] == list(range(5))
        for prev, cur in zip(session, session[1:]):
            assert cur.prompt.startswith(prev.prompt)  # previous prompt + answer + new turn
            assert len(cur.prompt) > len(prev.prompt)
            assert cur.prompt.count("\nUser: ") == prev.prompt.count("\nUser: ") + 1
        assert all(r.doc_ids == () for r in session)


def test_longdoc_shares_document_prefix():
    reqs = workloads.generate("longdoc", n_docs=3, questions=4, doc_tokens=200, seed=0)
    assert len(reqs) == 12
    docs = text.make_documents(3, 200, seed=0)
    for r in reqs:
        (d,) = r.doc_ids
        assert r.prompt.startswith(docs[d]) and r.session == f"doc-{d}"
    assert [r.doc_ids[0] for r in reqs[:3]] == [0, 1, 2]  # interleaved: documents rotate
    grouped = workloads.generate("longdoc", n_docs=3, questions=4, doc_tokens=200, seed=0, order="grouped")
    assert sorted(r.prompt for r in grouped) == sorted(r.prompt for r in reqs)


def test_documents_sized_by_tokenizer():
    tokenizer = lambda s: s.split()  # noqa: E731 - one token per word, an exact stand-in
    docs = text.make_documents(5, 100, seed=0, tokenizer=tokenizer)
    assert [len(d.split()) for d in docs] == [100] * 5
    assert len(set(docs)) == 5
    approx = text.make_documents(2, 100, seed=0)
    assert all(len(d.split()) == round(100 * text.WORDS_PER_TOKEN) for d in approx)


def test_corpus_falls_back_to_synthetic_text():
    corpus = text.load_corpus(prefer_essays=False)
    assert corpus.source.startswith("synthetic")
    assert corpus.words == text.load_corpus(prefer_essays=False).words


def test_cli_n_caps_chat_requests(tmp_path):
    lines = run_cli(tmp_path, "c", "--kind", "chat", "--n", "10", "--rounds", "4").splitlines()
    assert len(lines) == 10
