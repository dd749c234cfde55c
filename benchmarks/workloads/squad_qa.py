"""Offline extractive QA over real passages for the blending benchmark: SQuAD v1.1 dev.

Data: `squad_shifts/squaddev_v1.1.json` from the BIG-bench source archive on PyPI
(`bigbench-1.0.0.tar.gz`, 358 MB; see ../shared/MODELS.md). `fetch_squad(data_dir)` downloads the
archive once (sha256 checked), reads that one member with tarfile and keeps it under
`<data_dir>/bigbench/` (an ignored folder: the file carries BIG-bench's canary string and is
never committed).

A passage is a run of consecutive paragraphs of one Wikipedia article, grown to about
`passage_tokens` tokens; the pool takes one passage from each of `pool` articles, so a question's
distractors never come from its own article. A question is asked about a paragraph inside its gold
passage; its prompt holds the gold passage among `docs_per_prompt - 1` other pool passages, all in
a seeded shuffled order, so passages recur across prompts at new positions (what blending serves).
Gold answers are SQuAD's (several annotators); an answer is correct when one of them, normalised
the SQuAD way (lower case, no punctuation or articles), occurs in the first line of the generated
text. Token F1 (SQuAD's) is reported beside it.

    fetch_squad(data_dir) -> Path                     the extracted JSON (downloads at most once)
    build(path, n_questions, pool, docs_per_prompt, passage_tokens, seed, tokenizer, frame) -> QASet
    answer_correct(text, golds) / answer_f1(text, golds)
"""
from __future__ import annotations

import json
import random
import re
import string
import tarfile
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import SEPARATOR, file_sha256
from .multidoc_qa import FramedPrompts, Frame, plain_frame
from .text import Tokenizer

ARCHIVE_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7f"
               "ddba8cfc721c157/bigbench-1.0.0.tar.gz")
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/squaddev_v1.1.json"
SYSTEM = ("Answer the question using the documents below. "
          "Answer with a short phrase copied from the documents.")  # no '#': not the separator
MAX_ANSWER_WORDS = 4  # short extractive answers: a correct one is easy to recognise


def fetch_squad(data_dir: Path | str) -> Path:
    """The SQuAD dev JSON under <data_dir>/bigbench/, downloaded and extracted on first use."""
    folder = Path(data_dir) / "bigbench"
    out = folder / "squaddev_v1.1.json"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "bigbench-1.0.0.tar.gz"
    if not archive.exists() or file_sha256(archive) != ARCHIVE_SHA256:
        tmp = archive.with_suffix(".part")
        urllib.request.urlretrieve(ARCHIVE_URL, tmp)  # noqa: S310 - a fixed https URL
        if file_sha256(tmp) != ARCHIVE_SHA256:
            tmp.unlink()
            raise RuntimeError(f"{ARCHIVE_URL}: sha256 mismatch")
        tmp.rename(archive)
    with tarfile.open(archive) as t:
        data = t.extractfile(MEMBER).read()
    json.loads(data)  # a JSON document, nothing else is ever loaded from it
    out.write_bytes(data)
    return out


@dataclass(frozen=True)
class QAItem:
    qid: int
    doc_ids: tuple[int, ...]  # passages in prompt order
    target: int  # the gold passage (one of doc_ids)
    question: str
    answer: str  # the first gold answer (for display)
    answers: tuple[str, ...] = ()  # every gold answer
    answer_prefix: str = ""


@dataclass(frozen=True)
class QASet(FramedPrompts):
    passages: tuple[str, ...]
    items: tuple[QAItem, ...]
    frame: Frame
    system: str = SYSTEM
    source: str = "SQuAD v1.1 dev (BIG-bench squad_shifts)"
    params: dict = field(default_factory=dict)

    def correct(self, item: QAItem, text: str) -> bool:
        return answer_correct(text, item.answers)

    @staticmethod
    def answer_key(text: str) -> str:
        """What two answers must share to agree: the normalised first line."""
        return normalize(_first_line(text))


def _passages(articles: list[dict], passage_tokens: int, tokenizer: Tokenizer | None):
    """Per article: (passage text, [(paragraph index, qas)]) from its first paragraphs, about
    passage_tokens long (word count x 1.4 without a tokenizer)."""
    count = (lambda s: len(tokenizer(s))) if tokenizer else (lambda s: int(len(s.split()) * 1.4))
    out = []
    for art in articles:
        paras, used = [], 0
        for p in art["paragraphs"]:
            text = " ".join(p["context"].split())  # no newlines or runs of spaces inside a passage
            if "#" in text:  # would make a chunk separator inside the passage
                continue
            n = count(text)
            if paras and used + n > passage_tokens:
                break
            paras.append((text, p["qas"]))
            used += n
        out.append((" ".join(t for t, _ in paras), [q for _, qas in paras for q in qas]))
    return out


def build(path: Path | str, n_questions: int = 60, pool: int = 24, docs_per_prompt: int = 6,
          passage_tokens: int = 512, seed: int = 0, tokenizer: Tokenizer | None = None,
          frame: Frame | None = None) -> QASet:
    """The QA set (see the module docstring). Questions cycle through the pool's passages as
    gold (every passage is asked about once before any twice); only questions whose answers are
    at most MAX_ANSWER_WORDS words are used."""
    articles = json.loads(Path(path).read_text())["data"]
    if not 1 <= docs_per_prompt <= pool <= len(articles):
        raise ValueError(f"need 1 <= docs_per_prompt={docs_per_prompt} <= pool={pool} <= {len(articles)} articles")
    rng = random.Random(f"squad_qa-{seed}")
    chosen = rng.sample(articles, pool)
    built = _passages(chosen, passage_tokens, tokenizer)
    passages = tuple(text for text, _ in built)
    questions = []
    for doc, (_, qas) in enumerate(built):
        ok = [q for q in qas if q["answers"] and all(len(a["text"].split()) <= MAX_ANSWER_WORDS for a in q["answers"])]
        rng.shuffle(ok)
        questions.append(ok)
    items, order = [], list(range(pool))
    rng.shuffle(order)
    for qid in range(n_questions):
        target = order[qid % pool]
        if not questions[target]:
            raise ValueError(f"passage {target} has no usable question")
        q = questions[target][(qid // pool) % len(questions[target])]
        others = rng.sample([d for d in range(pool) if d != target], docs_per_prompt - 1)
        ids = others + [target]
        rng.shuffle(ids)
        golds = tuple(dict.fromkeys(a["text"].strip() for a in q["answers"]))
        items.append(QAItem(qid, tuple(ids), target, " ".join(q["question"].split()), golds[0], golds))
    params = {"n_questions": n_questions, "pool": pool, "docs_per_prompt": docs_per_prompt,
              "passage_tokens": passage_tokens, "seed": seed}
    return QASet(passages, tuple(items), frame or plain_frame(), params=params)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def answer_correct(text: str, golds) -> bool:
    pred = f" {normalize(_first_line(text))} "
    return any(normalize(g) and f" {normalize(g)} " in pred for g in golds)


def answer_f1(text: str, golds) -> float:
    pred = normalize(_first_line(text)).split()
    best = 0.0
    for g in golds:
        gold = normalize(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best
