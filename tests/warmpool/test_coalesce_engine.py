"""Concurrent ``model.generate`` calls gathered into streamed batches (``runtime._coalesce``).

Against a real CPU engine process. The gathering is made deterministic by its knobs:
``min_company=0`` and a long ``window`` make every call wait for company until
``max_batch`` calls have gathered, so N threads form exactly one batch of N.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from runtime import EngineRejectedError, GenerateResult, Model
from runtime._coalesce import FINALS_ONLY, Coalescer, _key


def _gathering(url: str, n: int, *, probe: Callable[[], bool] | None = None) -> Model:
    """A handle whose next ``n`` concurrent plain calls form one batch."""
    model = Model(url, "tiny")
    assert model._batches is not None and model._posts is not None
    if probe is not None:
        model._batches = Coalescer(model._posts.post_lines, probe)
    model._batches.min_company, model._batches.window, model._batches.max_batch = 0, 30.0, n
    return model


def _concurrently(calls: list[Callable[[], Any]]) -> tuple[list[Any], list[int]]:
    """Run the calls on threads; their results (or exceptions) and the order they returned in."""
    results: list[Any] = [None] * len(calls)
    order: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc
        with lock:
            order.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(order) == len(calls), "a call never returned"
    return results, order


PROMPTS = ["The capital of France is", "Once upon a time", "Hello", "The quick brown fox"]


def test_a_batch_answers_each_call_as_its_item_ends_and_as_alone(url: str) -> None:
    model = _gathering(url, 8)
    long = {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}
    short = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    params = [short] + [long] * 7
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    calls = [(lambda i=i: model.bind(f"co-{i}").generate(prompts[i], params[i])) for i in range(8)]
    results, order = _concurrently(calls)
    assert model._batches is not None
    assert (model._batches.batches, model._batches.batched) == (1, 8)  # one request carried all eight
    assert order[0] == 0  # the one-token call did not wait for the 48-token ones
    alone = Model(url, "tiny")
    assert alone._batches is not None
    alone._batches.enabled = False
    for i, got in enumerate(results):
        assert isinstance(got, GenerateResult)
        want = alone.generate(prompts[i], params[i])
        assert (got.text, got.output_ids, got.finish_reason) == (
            want.text,
            want.output_ids,
            want.finish_reason,
        )
        assert got.prompt_tokens == want.prompt_tokens and got.completion_tokens == len(got.output_ids)
        assert got.meta_info["id"] == f"co-{i}-0"  # each item kept its own request id


def test_a_batch_the_engine_refuses_is_sent_again_call_by_call(url: str) -> None:
    model = _gathering(url, 4)
    sampling = {"max_new_tokens": 4, "temperature": 0}
    too_long = "word " * 50_000  # past the model's context: the engine refuses the whole batch
    prompts = [PROMPTS[0], too_long, PROMPTS[1], PROMPTS[2]]
    results, _ = _concurrently([(lambda p=p: model.generate(p, sampling)) for p in prompts])
    assert model._batches is not None and model._batches.batches == 0  # refused, so none answered
    assert isinstance(results[1], EngineRejectedError) and "context" in str(results[1])
    for i in (0, 2, 3):
        assert isinstance(results[i], GenerateResult) and len(results[i].output_ids) >= 1


def test_an_engine_that_does_not_stream_batches_gets_every_call_alone(url: str) -> None:
    asked: list[int] = []
    model = _gathering(url, 4, probe=lambda: bool(asked.append(1)))
    sampling = {"max_new_tokens": 2, "temperature": 0}
    results, _ = _concurrently([(lambda p=p: model.generate(p, sampling)) for p in PROMPTS])
    assert all(isinstance(r, GenerateResult) for r in results)
    assert model._batches is not None and model._batches.batches == 0
    assert asked == [1]  # asked once, remembered


def test_calls_at_light_load_go_alone_at_once(url: str) -> None:
    model = Model(url, "tiny")
    for prompt in PROMPTS:
        assert len(model.generate(prompt, {"max_new_tokens": 2, "temperature": 0}).output_ids) >= 1
    assert model._batches is not None and model._batches.batches == 0
    assert model._batches.enabled is None  # never needed to ask the engine


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"text": "hi", "sampling_params": {}, "rid": "r-0"}, ("text", None)),
        ({"input_ids": [1, 2], "rid": "r-0", "priority": 3}, ("input_ids", 3)),
        ({"text": ["a", "b"], "rid": ["r-0", "r-1"]}, None),  # already a batch
        ({"input_ids": [[1], [2]], "rid": ["r-0", "r-1"]}, None),
        ({"text": "hi", "rid": "r-0", "return_logprob": True}, None),  # per-call options: alone
        ({"text": "hi", "rid": "r-0", "stream": True}, None),
        ({"text": "hi", "rid": "r-0", "lora_path": "chem"}, None),
        ({"text": "hi", "rid": "r-0", "sampling_params": [{}]}, None),
        ({"text": "hi"}, None),  # no rid of its own to route the answer by
    ],
)
def test_only_plain_calls_gather(body: dict[str, Any], key: tuple[str, Any] | None) -> None:
    assert _key(body) == key


def test_the_engine_says_it_streams_batches(url: str) -> None:
    info = Model(url, "tiny").engine_info()
    assert info["batched_streams"] is True
    assert FINALS_ONLY > 2**30  # no generation reaches it: only final chunks are streamed


@pytest.mark.parametrize(("max_wait", "counts"), [(30.0, (1, 4)), (1.5, (1, 3))])
def test_a_gathering_lasts_while_calls_keep_coming_up_to_max_wait(
    url: str, max_wait: float, counts: tuple[int, int]
) -> None:
    """Calls 0.6 s apart with a 1.2 s quiet window: all four gather over 1.8 s (a fixed 1.2 s
    wait would have ended before the last came); capped at 1.5 s, the first three do and the
    fourth goes alone.

    Every arrival is 0.3-0.6 s from the edge it must fall on, so a thread woken late does not
    change the outcome.
    """
    model = Model(url, "tiny")
    gen = model._batches
    assert gen is not None
    gen.min_company, gen.window, gen.max_wait, gen.max_batch = 0, 1.2, max_wait, 64
    sampling = {"max_new_tokens": 2, "temperature": 0}
    start = threading.Barrier(4)

    def call(i: int) -> GenerateResult:
        start.wait()
        time.sleep(0.6 * i)  # staggered arrivals (the spacing under test), not synchronisation
        return model.bind(f"gap-{i}").generate(PROMPTS[i], sampling)

    results, _ = _concurrently([(lambda i=i: call(i)) for i in range(4)])
    assert all(isinstance(r, GenerateResult) for r in results)
    assert (gen.batches, gen.batched) == counts
