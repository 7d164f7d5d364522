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
