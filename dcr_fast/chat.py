"""Chat-template encoding: prompts as the model sees them at inference, and response masks.

Both training stages, the evaluation and the eNTK engine format prompts with the model's own
chat template up to the assistant turn, so every stage measures the position that predicts the
first response token.
"""

from __future__ import annotations

from typing import Any


def check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"model: the tokenizer of {where!r} has no chat template; DCR and SFT format prompts with the "
            "model's own template (use an instruct/chat checkpoint or set tokenizer.chat_template)"
        )


def encode_prompt(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of the chat-templated prompt up to the assistant turn's first token."""
    return _ids(tokenizer.apply_chat_template(_messages(prompt, system), add_generation_prompt=True, tokenize=True))


def encode_example(tokenizer, prompt: str, response: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a templated (prompt, response) pair and the mask of response tokens.

    Stock templates have no ``{% generation %}`` tags, so the mask is the part of the full
    conversation past the templated prompt; this needs the prompt to be a token prefix of the
    conversation, which is checked rather than assumed.
    """
    prompt_ids = encode_prompt(tokenizer, prompt, system)
    messages = _messages(prompt, system) + [{"role": "assistant", "content": response}]
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template does not render the prompt as a token prefix of the conversation; "
            "response-only loss cannot be masked for this template"
        )
    return full, [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}]


def _ids(encoded: Any) -> list[int]:
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)

