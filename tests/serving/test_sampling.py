"""Token choice and stop strings, on hand-made distributions and texts."""

from __future__ import annotations

import pytest
import torch

from lorakit.serving.sampling import SamplingParams, StopText, next_tokens


def test_greedy_rows_take_the_argmax_and_sampling_rows_their_own_draw() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    greedy, sampled = SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    # top_p=0.5 keeps only the most likely token of row 1 (softmax ≈ 0.987): sampling is then certain
    assert next_tokens(logits, [greedy, sampled], [None, sampled.generator()]) == [1, 0]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    generator = params.generator()
    seen = {next_tokens(probs.log().unsqueeze(0), [params], [generator])[0] for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8; 0.15 and 0.05 are cut


def test_a_seed_reproduces_and_no_seed_differs() -> None:
    logits = torch.zeros(1, 1000)
    draws = [
        [next_tokens(logits, [p], [g])[0] for _ in range(5)]
        for p in (SamplingParams(seed=3), SamplingParams(seed=3))
        for g in [p.generator()]
    ]
    assert draws[0] == draws[1]


@pytest.mark.parametrize(
    ("steps", "stop", "sent", "text"),
    [
        (["a", "a b", "a b c"], [], ["a", " b", " c"], "a b c"),
        (["x", "x E", "x END", "x END y"], ["END"], ["x", " ", "", ""], "x "),  # "E" held, then cut
        (["x", "x E", "x Ez"], ["END"], ["x", " ", "Ez"], "x Ez"),  # "E" released when it cannot stop
        (["caf", "caf\ufffd", "café"], [], ["caf", "", "é"], "café"),  # half a character waits
    ],
)
def test_stop_text_sends_only_what_cannot_change(
    steps: list[str], stop: list[str], sent: list[str], text: str
) -> None:
    state, out = StopText(stop), []
    for i, step in enumerate(steps):
        if not state.stopped:
            state.update(step)
        out.append(state.delta(final=state.stopped or i == len(steps) - 1))
    assert out == sent
    assert state.text == text
