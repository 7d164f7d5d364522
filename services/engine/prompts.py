"""From user text to prompt token ids and back, the same way for every method and front end."""

from __future__ import annotations

# End-of-turn markers of the chat formats our models use; any of them present in the vocabulary stops a turn.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat (the model's own template) ending with the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


class Conversation:
    """A chat that grows turn by turn, each answer appended before the next user turn: how the
    benchmark, the profiler and chat apps run multi-turn questions (a second turn that asks to
    rework the first answer is where the context DB shines)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.messages: list[dict[str, str]] = []

    def ask(self, text: str) -> list[int]:
        """The prompt ids of the chat with this user turn added."""
        self.messages.append({"role": "user", "content": text})
        return chat_prompt_ids(self.tokenizer, self.messages)

    def answer(self, token_ids: list[int]) -> None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The tokenizer's EOS plus the end-of-turn tokens its vocabulary has."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in _END_OF_TURN_TOKENS if token in vocab)
    return frozenset(ids)
