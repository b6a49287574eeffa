"""Chat data for ``--task causal-lm``: conversations rendered with the tokenizer's own chat template,
the loss on the assistant turns only.

A row's messages are ``[{"role": "system" | "user" | "assistant", "content": "..."}, ...]``, the
format chat datasets use. The conversation is rendered once with ``apply_chat_template``; each
assistant turn's characters are found by rendering the conversation up to the turn (with the
generation prompt) and up to its end, and the tokens whose characters fall in such a span are the
targets (their end-of-turn marker included, so the model learns to stop). This works for any
template that renders a conversation's beginning as a prefix of the whole, which is checked: a
template that rewrites earlier turns is refused rather than mislabelled. (The templates' own
``{% generation %}`` markers would do the same, but few templates have them; SmolLM2's has not.)
"""

from __future__ import annotations

from typing import Any

from lorakit.cli.errors import CliError

__all__ = ["is_chat", "encode_chat", "ROLES"]

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100


def is_chat(value: Any) -> bool:
    """Whether ``value`` is a list of ``{role, content}`` messages."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _render(tokenizer: Any, messages: list[dict[str, Any]], prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))


def _check(messages: Any, row: int) -> list[dict[str, Any]]:
    if not is_chat(messages):
        raise CliError(
            f"row {row + 1}: chat data must be a list of {{role, content}} messages, got {messages!r:.80}"
        )
    roles = [m["role"] for m in messages]
    if any(r not in ROLES for r in roles):
        raise CliError(
            f"row {row + 1}: unknown role(s) {sorted(set(roles) - set(ROLES))}; roles: {', '.join(ROLES)}"
        )
    if "assistant" not in roles:
        raise CliError(f"row {row + 1} has no assistant message: there is nothing to learn from it")
    return [{"role": m["role"], "content": str(m["content"])} for m in messages]


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], row: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span of each assistant turn in it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CliError(
            "the tokenizer has no chat template, so chat messages cannot be rendered; use a chat "
            "model (its tokenizer_config.json holds chat_template) or a text column"
        )
    text = _render(tokenizer, messages, prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise CliError(
                f"row {row + 1}: the tokenizer's chat template does not render a conversation's "
                "beginning as a prefix of the whole, so the assistant turns cannot be located"
            )
        spans.append((len(before), len(through)))
    return text, spans


def encode_chat(messages: Any, tokenizer: Any, max_length: int, row: int = 0) -> dict[str, Any]:
    """Token ids of the rendered conversation, and labels that are the ids on assistant turns and
    ``-100`` elsewhere; cut at ``max_length`` tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise CliError("chat data needs a fast tokenizer (tokenizer.json), to map tokens to characters")
    text, spans = assistant_spans(tokenizer, _check(messages, row), row)
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    labels = [
        token if any(start <= first < end for start, end in spans) else IGNORE
        for token, (first, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return {"input_ids": list(enc["input_ids"]), "attention_mask": [1] * len(labels), "labels": labels}
