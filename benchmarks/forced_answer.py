"""A vLLM logits processor that forces a request's output to given token ids (teacher forcing for
the blend benchmark's answer log-likelihood).

    ForceAnswer     engine-level processor (LLM(logits_processors=["forced_answer:ForceAnswer"]));
                    acts only on requests whose SamplingParams.extra_args carry "force_token_ids"

vLLM's sampler takes the logprobs it returns from the raw logits, before logits processors run
(logprobs_mode "raw_logprobs", the default), so the logprob of each forced token is the model's
own log-probability of the gold answer's next token given the prompt and the answer so far:
the same numbers prompt_logprobs would give with the answer appended to the prompt (checked
equal to the last digit in bf16 on a full prefill), but the prompt stays the question, so a
blend's selection (the query policy's relevance pass reads the prompt after the last chunk)
never sees the answer.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor


class ForceAnswer(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy choice: vLLM must apply it under temperature 0

    def new_req_logits_processor(self, params):
        ids = (params.extra_args or {}).get("force_token_ids")
        if not ids:
            return None
        ids = [int(t) for t in ids]

        def force(out_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            keep = ids[min(len(out_ids), len(ids) - 1)]
            mask = torch.full_like(logits, float("-inf"))
            mask[keep] = 0.0
            return logits + mask

        return force
