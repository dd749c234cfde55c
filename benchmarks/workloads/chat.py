"""Multi-round chat workload: each round's prompt extends the previous one.

    generate(n_sessions, rounds, turn_tokens, answer_tokens, seed, ...) -> list[Request]

Round r of a session: prompt_r = prompt_{r-1} + answer_{r-1} + "\\nUser: <turn r>\\nAssistant:",
prompt_0 = system line + the first turn. The answer is a placeholder (corpus text of
answer_tokens), standing in for what the model said, so the history grows as in real serving
and every prompt starts with the previous one (a pure prefix-cache workload). Requests are
ordered round by round (all sessions' round 0, then round 1, ...), as they arrive in serving.
"""
from __future__ import annotations

import random

from . import Request
from .text import Tokenizer, fit_words, load_corpus, user_turn

SYSTEM = "System: You are a helpful assistant. Answer briefly and precisely."


def _answer(rng: random.Random, words: tuple[str, ...], tokens: int, tokenizer: Tokenizer | None) -> str:
    start = rng.randrange(len(words))
    window = [words[(start + j) % len(words)] for j in range(tokens)]
    return " " + fit_words(window, tokens, tokenizer)


def generate(n_sessions: int = 8, rounds: int = 6, turn_tokens: int = 64, answer_tokens: int = 96,
             seed: int = 0, max_tokens: int = 32, tokenizer: Tokenizer | None = None) -> list[Request]:
    if n_sessions < 0 or rounds < 1 or turn_tokens < 1 or answer_tokens < 1:
        raise ValueError(f"n_sessions={n_sessions} must be >= 0; rounds={rounds}, "
                         f"turn_tokens={turn_tokens}, answer_tokens={answer_tokens} must be >= 1")
    corpus = load_corpus()
    rng = random.Random(f"chat-{seed}")
    prompts = [f"{SYSTEM}\nUser: {user_turn(rng, corpus, turn_tokens, tokenizer)}\nAssistant:"
               for _ in range(n_sessions)]
    out = []
    for r in range(rounds):
        for s in range(n_sessions):
            if r > 0:
                answer = _answer(rng, corpus.words, answer_tokens, tokenizer)
                turn = user_turn(rng, corpus, turn_tokens, tokenizer)
                prompts[s] = f"{prompts[s]}{answer}\nUser: {turn}\nAssistant:"
            out.append(Request(prompt=prompts[s], session=f"chat-{s}", round=r, doc_ids=(),
                               max_tokens=max_tokens))
    return out
