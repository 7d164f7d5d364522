"""The target replica that runs a one-level hierarchy's rounds (`serving.rounds_in: target`), in this process.

Serve pulls a streaming method's next message only after writing the last one, so the rounds run in a task of
their own (`deploy.app.rounds_service`): here a reader that takes its time stands in for a slow write. The
Serve path itself (HTTP, log-probabilities, a client leaving, a stop string, a crash) is tested in test_serve.
"""

from __future__ import annotations

import asyncio

from deploy.app.rounds_service import TargetRounds
from deploy.cli import _generate_once
from deploy.config import config_for_models
from services.engine.prompts import chat_prompt_ids, stop_token_ids
from services.engine.sampling import SamplingParams

PROMPT = "List three uses of a hash map, one per line."
TOKENS = 32


def test_rounds_run_ahead_of_a_slow_reader_and_stop_when_it_leaves():
    """SmolLM2 `hd` (bfloat16): a reader that sleeps after each message still gets exactly plain decoding's
    tokens, log-probabilities and finish reason, in fewer messages than rounds (the rounds did not wait for it:
    those committed meanwhile came together, each token with its log-probability); a reader that leaves after
    the first message stops the rounds, and the replica holds no running request's cache."""
    config = config_for_models("smollm2-135m", []).model_copy(update={"method": "hd"})
    service = TargetRounds(config.model_dump(), "hd", "smollm2-135m", config.dtype, "cpu", None, None, 1)
    tokenizer = service.runner.tokenizer
    prompt_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": PROMPT}])
    plain, _ = _generate_once(config, "ar", None, PROMPT, TOKENS, 0.0, None, True, logprobs=1)
    assert plain.finish_reason == "length"  # every round sends tokens: as many messages as rounds, unmerged

    async def read(request_id: str, pause_s: float, leave_after: int | None = None) -> tuple[list, dict]:
        """The messages read, and the replica's state a second after the reader is done."""
        outputs = []
        stream = service.generate(request_id, prompt_ids, SamplingParams(logprobs=1), TOKENS,
                                  stop_token_ids(tokenizer))
        async for output in stream:
            outputs.append(output)
            if len(outputs) == leave_after:
                await stream.aclose()
                break
            await asyncio.sleep(pause_s)
        await asyncio.sleep(1.0)  # in this loop: rounds left running would compute meanwhile
        return outputs, service.batching()

    outputs, state = asyncio.run(read("slow", 0.25))
    assert [token for output in outputs for token in output.tokens] == plain.token_ids
    assert outputs[-1].finish_reason == plain.finish_reason
    assert all(len(output.logprobs) == len(output.tokens) for output in outputs[:-1])
    assert [entry for output in outputs[:-1] for entry in output.logprobs] == plain.logprobs
    rounds = outputs[-1].stats.levels[-1].verifications
    assert len(outputs) - 1 < rounds, (len(outputs), rounds)
    assert state["cached_requests"] == 0, "a finished generation holds its cache"

    left, after = asyncio.run(read("leaves", 0.0, leave_after=1))
    assert left[0].tokens and left[0].finish_reason is None
    assert after["forwards"] <= state["forwards"] + 3, "the rounds went on for a reader that left"
    assert after["cached_requests"] == 0, "the generation holds its cache"
