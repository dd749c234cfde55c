"""The SQuAD family of the blend benchmark (benchmarks/workloads/squad_qa.py) on a small file in
SQuAD's format (the real one comes from the BIG-bench archive at benchmark set-up, never in CI)."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.workloads import SEPARATOR  # noqa: E402
from benchmarks.workloads import squad_qa as sq  # noqa: E402


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    arts = []
    for a in range(8):
        paras = []
        for p in range(3):
            ctx = " ".join(f"Article{a} paragraph{p} sentence{s} mentions item{a * 10 + p}x{s}." for s in range(12))
            qas = [{"id": f"{a}-{p}-{q}", "question": f"Which item does article {a} paragraph {p} name {q}?",
                    "answers": [{"text": f"item{a * 10 + p}x{q}", "answer_start": 0},
                                {"text": f"item{a * 10 + p}x{q}.", "answer_start": 0}]} for q in range(3)]
            qas.append({"id": f"{a}-{p}-long", "question": "A question with a long answer?",
                        "answers": [{"text": "one two three four five six", "answer_start": 0}]})
            paras.append({"context": ctx, "qas": qas})
        arts.append({"title": f"T{a}", "paragraphs": paras})
    path = tmp_path_factory.mktemp("squad") / "squad.json"
    path.write_text(json.dumps({"data": arts, "version": "1.1"}))
    return path


def test_gold_passage_among_distractors_from_other_articles(squad_file):
    qs = sq.build(squad_file, n_questions=12, pool=6, docs_per_prompt=4, passage_tokens=200, seed=0)
    assert len(qs.passages) == 6 and len(qs.items) == 12
    for it in qs.items:
        assert it.target in it.doc_ids and len(set(it.doc_ids)) == 4
        article = qs.passages[it.target].split()[0]  # "ArticleN"
        assert sum(qs.passages[d].startswith(article) for d in it.doc_ids) == 1  # no distractor from it
        assert any(g in qs.passages[it.target] for g in it.answers)  # the gold answer is in the gold passage
        assert all(len(g.split()) <= sq.MAX_ANSWER_WORDS for g in it.answers)
    prompt = qs.prompt(qs.items[0])
    assert prompt.count(SEPARATOR) == 4 + 1  # one before each passage and the question


def test_passages_recur_in_new_orders_and_the_set_is_deterministic(squad_file):
    a = sq.build(squad_file, n_questions=20, pool=6, docs_per_prompt=4, passage_tokens=200, seed=0)
    b = sq.build(squad_file, n_questions=20, pool=6, docs_per_prompt=4, passage_tokens=200, seed=0)
    assert a == b
    orders = {it.doc_ids for it in a.items}
    assert len(orders) > 10  # passages come back in new combinations and orders
    assert sq.build(squad_file, n_questions=20, pool=6, docs_per_prompt=4, passage_tokens=200, seed=1) != a


def test_answers_are_matched_after_squad_normalisation():
    golds = ("the Denver Broncos", "Broncos")
    assert sq.answer_correct("The Denver Broncos represented the AFC.", golds)
    assert sq.answer_correct("broncos!", golds)
    assert not sq.answer_correct("The Carolina Panthers.\nDenver Broncos", golds)  # first line only
    assert not sq.answer_correct("Broncosville", golds)  # whole words
    assert sq.answer_f1("Denver Broncos", golds) == 1.0 and 0 < sq.answer_f1("Denver team", golds) < 1
    assert sq.QASet.answer_key("The  Broncos.\nmore") == "broncos"


def test_bad_sizes_raise(squad_file):
    with pytest.raises(ValueError):
        sq.build(squad_file, n_questions=4, pool=9, docs_per_prompt=4)  # more than 8 articles
    with pytest.raises(ValueError):
        sq.build(squad_file, n_questions=4, pool=3, docs_per_prompt=4)
