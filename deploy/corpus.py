"""`hierspec db answers`: a chat corpus for the statistics DB, in the model's own words.

A chat model's answers share openings, list layouts and stock phrases that no
text on disk has, so corpus statistics from source code or prose rarely hit on
chat. The model's own greedy answers to a prompt set that is disjoint from the
benchmark (`deploy/chat_prompts.jsonl` by default) give the statistics DB that
voice at the cost of one generation run; `hierspec db build --corpus` then
reads the file like any JSONL. One answer per line, appended as it finishes,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from deploy.builder import configure_torch
from deploy.config import HierspecConfig, packaged_path
from deploy.planner.auto import method_decoder
from deploy.workload import load_workload
from services.engine.prompts import Conversation, stop_token_ids
from services.engine.sampling import SamplingParams


def write_answers(config: HierspecConfig, method: str, dtype: str | None, prompts: str, out: Path,
                  max_tokens: int, log: Callable[[str], None]) -> dict:
    """Append {"text": answer} for every turn of every prompt not yet in `out`; returns a summary."""
    questions = load_workload(str(packaged_path(prompts)), None, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = len(out.read_text().splitlines()) if out.exists() else 0
    turns = [(q, i) for q in questions for i in range(len(q.turns))]
    if done >= len(turns):
        return {"answers": len(turns), "generated": 0, "tokens": 0, "path": str(out)}
    configure_torch(config)
    decoder = method_decoder(config, method, dtype)
    tokenizer = decoder.target.runner.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    generated = tokens = 0
    chats: dict[object, Conversation] = {}
    with out.open("a") as sink:
        for index, (question, turn) in enumerate(turns):
            chat = chats.setdefault(question.question_id, Conversation(tokenizer))
            if index < done and turn == len(question.turns) - 1:
                continue  # written by an earlier run, and no later turn needs it in the chat
            generation = decoder.generate(chat.ask(question.turns[turn]), SamplingParams(), max_tokens, stop_ids)
            chat.answer(generation.token_ids)
            if index < done:
                continue  # written before; regenerated (greedy: the same) only for the turns that follow it
            sink.write(json.dumps({"text": tokenizer.decode(generation.token_ids, skip_special_tokens=True)}) + "\n")
            sink.flush()
            generated += 1
            tokens += len(generation.token_ids)
            log(f"[{index + 1}/{len(turns)}] {question.question_id}: {len(generation.token_ids)} tokens")
    return {"answers": len(turns), "generated": generated, "tokens": tokens, "path": str(out)}
