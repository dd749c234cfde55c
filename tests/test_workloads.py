"""Workload generators (benchmarks/workloads): determinism per seed, sizes, Zipf skew, chat
history growth, separators, the retrieval trace (repeat share, k, lengths, score order, joins,
fresh documents), the JSONL command line and vLLM's custom-dataset export."""
import collections
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import workloads  # noqa: E402
from benchmarks.workloads import SEPARATOR, Request, rag, retrieval, text  # noqa: E402


def run_cli(tmp_path: Path, name: str, *args: str) -> bytes:
    out = tmp_path / f"{name}.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.workloads", *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


@pytest.mark.parametrize("kind,args", [("rag", ["--n", "30", "--docs", "20"]),
                                       ("chat", ["--sessions", "3", "--rounds", "4"]),
                                       ("longdoc", ["--docs", "2", "--questions", "3", "--doc-tokens", "300"]),
                                       ("retrieval", ["--n", "12", "--docs", "30"])])
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


# ---------------------------------------------------------------- retrieval
WORD_TOKENIZER = lambda s: s.split()  # noqa: E731 - one token per word, an exact stand-in


def test_retrieval_default_trace_repeats_at_least_60_percent_of_document_occurrences():
    reqs = retrieval.generate()  # the defaults the serve benchmark's full run uses
    assert len(reqs) == 48 and len(set(r.prompt for r in reqs)) == 48
    counted = collections.Counter()
    repeats = 0
    for r in reqs:
        repeats += sum(1 for d in r.doc_ids if counted[d])
        counted.update(r.doc_ids)
    share = repeats / sum(counted.values())
    assert retrieval.repeat_share(reqs) == pytest.approx(share) and share >= 0.6
    assert len(counted) < 200  # not every document of the corpus is retrieved
    firsts = [r.doc_ids[0] for r in reqs]
    assert retrieval.first_document_repeat_share(reqs) == pytest.approx(
        sum(1 for i, d in enumerate(firsts) if d in firsts[:i]) / 48)


def test_repeat_share_of_a_hand_made_trace():
    mk = lambda ids: Request(prompt="p", session="s", round=0, doc_ids=ids, max_tokens=1)  # noqa: E731
    reqs = [mk((1, 2)), mk((2, 3)), mk((3, 1, 4))]
    assert retrieval.repeat_share(reqs) == pytest.approx(3 / 7)
    assert retrieval.first_document_repeat_share(reqs) == 0.0
    assert math.isnan(retrieval.repeat_share([]))


def test_retrieval_is_deterministic_per_seed():
    kw = dict(n=20, n_docs=40, doc_min_tokens=32, doc_max_tokens=64)
    a, b = retrieval.generate(**kw, seed=5), retrieval.generate(**kw, seed=5)
    assert a == b and retrieval.generate(**kw, seed=6) != a


def test_retrieval_k_range_distinct_documents_and_prompt_parts():
    docs = retrieval.documents(60, 16, 48, seed=1)
    reqs = retrieval.generate(n=150, n_docs=60, doc_min_tokens=16, doc_max_tokens=48, seed=1, max_tokens=9)
    assert set(collections.Counter(len(r.doc_ids) for r in reqs)) == set(range(4, 9))
    for i, r in enumerate(reqs):
        assert len(set(r.doc_ids)) == len(r.doc_ids) and r.max_tokens == 9
        parts = r.prompt.split(SEPARATOR)
        assert parts[0] == retrieval.SYSTEM_PROMPT  # the only prefix every request shares
        assert parts[1:-1] == [docs[d] for d in r.doc_ids]
        assert parts[-1].startswith(f"Question {i + 1}: ")
    narrow = retrieval.generate(n=30, n_docs=60, doc_min_tokens=16, doc_max_tokens=48, k_min=2, k_max=3)
    assert {len(r.doc_ids) for r in narrow} == {2, 3}


def test_retrieval_documents_lengths_vary_within_bounds_and_do_not_overlap():
    docs = retrieval.documents(80, 256, 768, seed=0, tokenizer=WORD_TOKENIZER)
    lengths = [len(d.split()) for d in docs]
    assert min(lengths) >= 256 and max(lengths) <= 768 and len(set(lengths)) > 40
    assert min(lengths) < 320 and max(lengths) > 700  # the whole range is used
    assert len(set(docs)) == 80
    assert retrieval.documents(30, 256, 768, seed=0, tokenizer=WORD_TOKENIZER) == docs[:30]  # growing n appends


def test_retrieve_takes_top_k_by_score_in_score_order():
    assert retrieval.retrieve(random.Random(0), [0.0, -1.0, -2.0, -3.0], 3, noise=0.0) == [0, 1, 2]

    class FixedDraws:  # Gumbel draws g = -log(-log(u)) from given uniforms
        def __init__(self, us):
            self.us = iter(us)

        def random(self):
            return next(self.us)

    us = [0.1, 0.5, 0.99, 0.7]
    gumbel = [-math.log(-math.log(u)) for u in us]
    log_pop = [0.0, -0.5, -1.0, -1.5]
    scores = [lp + 2.0 * g for lp, g in zip(log_pop, gumbel)]
    expected = sorted(range(4), key=lambda d: -scores[d])[:3]
    assert expected == [2, 3, 1]  # the least popular document won on its draw
    assert retrieval.retrieve(FixedDraws(us), log_pop, 3, noise=2.0) == expected


def test_retrieval_popular_documents_come_first_more_often():
    reqs = retrieval.generate(n=300, n_docs=50, doc_min_tokens=8, doc_max_tokens=16, seed=0)
    pos = collections.defaultdict(list)
    for r in reqs:
        for j, d in enumerate(r.doc_ids):
            pos[d].append(j / (len(r.doc_ids) - 1))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(pos[0]) < 0.35 < mean([x for d in range(10, 50) for x in pos[d]])
    counts = collections.Counter(d for r in reqs for d in r.doc_ids)
    assert counts[0] > counts[5] > counts[40]


def test_retrieval_join_newlines_and_shuffled_order():
    kw = dict(n=10, n_docs=30, doc_min_tokens=16, doc_max_tokens=32, seed=2)
    sep, nl = retrieval.generate(**kw), retrieval.generate(**kw, join="newlines")
    for a, b in zip(sep, nl):
        assert a.doc_ids == b.doc_ids and SEPARATOR not in b.prompt
        assert b.prompt.split("\n\n") == a.prompt.split(SEPARATOR)
    shuffled = retrieval.generate(**kw, order="shuffled")
    assert [sorted(r.doc_ids) for r in shuffled] == [sorted(r.doc_ids) for r in sep]
    assert [r.doc_ids for r in shuffled] != [r.doc_ids for r in sep]
    with pytest.raises(ValueError, match="join='tabs'"):
        retrieval.generate(**kw, join="tabs")
    with pytest.raises(ValueError, match="k_max=8 > n_docs=5"):
        retrieval.generate(n=1, n_docs=5)


def test_retrieval_fresh_requests_use_documents_no_trace_holds():
    kw = dict(n_docs=40, doc_min_tokens=16, doc_max_tokens=32, seed=3)
    trace = retrieval.generate(n=50, **kw)
    fresh = retrieval.fresh_requests(4, **kw)
    ids = [d for r in fresh for d in r.doc_ids]
    assert len(ids) == len(set(ids)) and min(ids) == 40
    docs = retrieval.documents(40 + len(ids), 16, 32, seed=3)
    trace_docs = {docs[d] for r in trace for d in r.doc_ids}
    for r in fresh:
        parts = r.prompt.split(SEPARATOR)
        assert parts[0] == retrieval.SYSTEM_PROMPT and parts[1:-1] == [docs[d] for d in r.doc_ids]
        assert not set(parts[1:-1]) & trace_docs


class _JsonLinesFrame:
    """What vLLM's CustomDataset uses of pandas.read_json(lines=True): columns and iterrows()."""

    def __init__(self, path, lines):
        import json
        assert lines
        with open(path, encoding="utf-8") as f:
            self.rows = [json.loads(x) for x in f if x.strip()]
        self.columns = sorted({k for r in self.rows for k in r})

    def iterrows(self):
        for i, r in enumerate(self.rows):
            yield i, type("Row", (), {"to_dict": lambda self, r=r: dict(r)})()


def test_vllm_custom_dataset_export_reads_back_through_vllm(tmp_path, monkeypatch):
    from vllm.benchmarks.datasets import datasets as vllm_datasets

    try:
        import pandas  # noqa: F401 - vLLM's reader when installed
    except ImportError:  # its JSONL parse stood in for; vLLM's own checks and sampling still run
        monkeypatch.setattr(vllm_datasets, "pd", type("pd", (), {"read_json": staticmethod(
            lambda path_or_buf, lines: _JsonLinesFrame(path_or_buf, lines))}))
    reqs = retrieval.generate(n=6, n_docs=30, doc_min_tokens=16, doc_max_tokens=32, max_tokens=7)
    path = tmp_path / "trace.jsonl"
    assert workloads.write_vllm_custom(reqs, path) == 6
    data = vllm_datasets.CustomDataset(dataset_path=str(path), disable_shuffle=True)
    assert [row["prompt"] for row in data.data] == [r.prompt for r in reqs]  # trace order kept
    assert [int(row["output_tokens"]) for row in data.data] == [7] * 6
    sampled = data.sample(tokenizer=None, num_requests=6, no_oversample=True)
    assert [s.prompt for s in sampled] == [r.prompt for r in reqs]


def test_cli_exports_vllm_custom_format(tmp_path):
    import json
    lines = run_cli(tmp_path, "v", "--kind", "retrieval", "--n", "3", "--docs", "20", "--format", "vllm-custom",
                    "--max-tokens", "5").splitlines()
    rows = [json.loads(x) for x in lines]
    assert [sorted(r) for r in rows] == [["output_tokens", "prompt"]] * 3 and rows[0]["output_tokens"] == 5
    assert rows[0]["prompt"].startswith(retrieval.SYSTEM_PROMPT + SEPARATOR)
