"""How one request picks its next token, and when its text ends.

Each request has its own :class:`SamplingParams` and, when it samples, its own ``torch.Generator``:
a request's tokens do not depend on which other requests share its batch (up to the rounding of the
batched products), and a ``seed`` reproduces them. ``temperature == 0`` is greedy decoding, the
argmax, which is what ``generate(do_sample=False)`` computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from lorakit.errors import ServingError

__all__ = ["SamplingParams", "next_tokens", "StopText"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields, validated once.

    ``max_tokens``: new tokens at most; ``temperature``: 0 (greedy) to 2; ``top_p``: the nucleus, in
    (0, 1]; ``stop``: strings that end the text (not included in it); ``seed``: reproducible
    sampling; ``ignore_eos``: keep going past the end-of-sequence token (vLLM's extension, for
    benchmarks with fixed lengths).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must hold non-empty strings, got {list(self.stop)!r}")
        if problems:
            raise ServingError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """The request's own random stream (``None`` when greedy): seeded, or from the OS."""
        if self.greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits`` (B, V): greedy rows by one argmax over the batch, sampling rows
    each with its temperature, nucleus and generator."""
    chosen = logits.argmax(dim=-1).tolist()  # (B,)
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            chosen[row] = _sample(logits[row].float(), p, generator)
    return chosen


def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Softmax at ``p.temperature``, keep the smallest set of most likely tokens whose probability
    reaches ``p.top_p`` (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"), draw."""
    probs = torch.softmax(logits / p.temperature, dim=-1)  # (V,)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= p.top_p] = 0.0  # the first token always stays (before = 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class StopText:
    """A request's text as its tokens arrive: what may be sent so far, and whether a stop string ended it.

    Text is sent only once it cannot change: a trailing replacement character (half of a multi-byte
    character) or a tail that could begin a stop string is held back until the next token decides.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.text = ""  # the whole text so far (after a stop: cut before it)
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def update(self, text: str) -> None:
        """``text``: the decoded text of every generated token so far."""
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text

    def delta(self, final: bool) -> str:
        """The text not yet handed out that can no longer change (all of it when ``final``)."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._unsettled_tail()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out

    def _unsettled_tail(self) -> int:
        text = self.text
        hold = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return hold
