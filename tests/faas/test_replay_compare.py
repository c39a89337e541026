"""The replay comparer: exact text and ids, floats within tolerance, timings ignored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from faas._replay_compare import Tolerance, compare
from runtime._model_results import ChatResult, GenerateResult

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sglang"


def sglang(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def paths(original: object, replay: object, tol: Tolerance | None = None) -> list[str]:
    return [d.path for d in compare(original, replay, tol).differences]


def test_timings_and_request_ids_are_ignored_floats_within_tolerance_match() -> None:
    a = sglang("generate_logprobs.json")
    a["meta_info"]["engine_share_seconds"] = 0.1  # the CPU engine's share of its busy time
    b = json.loads(json.dumps(a))
    b["meta_info"].update(id="another-rid", e2e_latency=9.5, cached_tokens=4, queue_time=1.0)
    b["meta_info"]["engine_share_seconds"] = 0.4
    b["meta_info"]["output_token_logprobs"][1][0] += 1e-6
    result = compare(a, b)
    assert result.matches, result.differences
    assert {
        "meta_info.id",
        "meta_info.e2e_latency",
        "meta_info.cached_tokens",
        "meta_info.queue_time",
        "meta_info.engine_share_seconds",
    } <= set(result.ignored)


def test_text_difference_is_reported_with_its_path() -> None:
    a = sglang("generate_single.json")
    b = json.loads(json.dumps(a))
    b["text"] = " The capital of France is Lyon."
    [d] = compare(a, b).differences
    assert (d.path, d.reason) == ("text", "value")
    assert "Paris" in d.original and "Lyon" in d.replay


def test_token_id_difference_is_exact() -> None:
    a = sglang("generate_single.json")
    b = json.loads(json.dumps(a))
    b["output_ids"][2] += 1
    assert paths(a, b, Tolerance(rtol=1.0, atol=1.0)) == ["output_ids[2]"]


def test_logprob_beyond_tolerance_is_reported_with_its_path() -> None:
    a = sglang("generate_logprobs.json")
    b = json.loads(json.dumps(a))
    b["meta_info"]["output_token_logprobs"][2][0] = -0.5  # was -0.0009
    b["meta_info"]["output_top_logprobs"][1][1][0] += 0.05  # -1.2531: beyond 1e-4 + 1e-3 * 1.25
    [d1, d2] = compare(a, b).differences
    assert (d1.path, d1.reason) == ("meta_info.output_token_logprobs[2][0]", "float")
    assert d1.original == "-0.0009" and d1.replay == "-0.5"
    assert (d2.path, d2.reason) == ("meta_info.output_top_logprobs[1][1][0]", "float")
    assert compare(a, b, Tolerance(rtol=0, atol=0.6)).matches


def test_tolerance_is_the_isclose_rule() -> None:
    assert compare(100.0, 100.0 + 0.1 + 1e-4 - 1e-9).matches  # within atol + rtol * |original|
    assert not compare(100.0, 100.0 + 0.1 + 1e-4 + 1e-6).matches
    assert not compare(1.0, 1.0 + 1e-9, Tolerance(rtol=0, atol=0)).matches
    assert compare(float("nan"), float("nan")).matches
    assert not compare(float("inf"), float("-inf")).matches
    assert compare(np.float32(0.5), 0.5).matches and compare(1, 1.0).matches
    with pytest.raises(ValueError, match="rtol"):
        Tolerance(rtol=-1)


def test_generate_result_hidden_states_and_logprob_arrays() -> None:
    raw = sglang("generate_hidden_states.json")
    raw["meta_info"]["output_token_logprobs"] = [[-0.1, 6303, None], [-0.2, 12884, None], [-0.3, 13, None]]
    a = GenerateResult.from_json(raw)
    other = json.loads(json.dumps(raw))
    other["meta_info"].update(id="x", e2e_latency=3.0)
    other["meta_info"]["hidden_states"][0][2][1] += 1e-6  # noise: within tolerance
    assert compare(a, GenerateResult.from_json(other)).matches
    other["meta_info"]["hidden_states"][0][2][1] += 0.5  # row 2 (prompt), column 1
    other["meta_info"]["hidden_states"][2][3] = 0.0  # row 4 (second decode step), column 3
    other["meta_info"]["output_token_logprobs"][1][0] = -2.0
    got = paths(a, GenerateResult.from_json(other))
    assert got == [
        "meta_info.output_token_logprobs[1][0]",
        "logprobs[1]",
        "hidden_states[2][1]",
        "hidden_states[4][3]",
    ]


def test_array_shape_type_and_missing_keys() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    [d] = compare({"e": x}, {"e": np.zeros((2, 2), dtype=np.float32)}).differences
    assert (d.path, d.reason) == ("e", "shape")
    [d] = compare({"e": [1.0]}, {"e": (1.0,)}).differences
    assert (d.path, d.reason) == ("e", "type")
    got = compare({"a": 1, "b": 2}, {"a": 1, "c": 2}).differences
    assert [(d.path, d.reason) for d in got] == [("b", "missing"), ("c", "extra")]
    [d] = compare([1, 2, 3], [1, 2]).differences
    assert (d.path, d.reason) == ("", "length")
    assert d.describe()["path"] == "<value>"
    # Timing names are ignored only in engine responses: a user's own "time" field counts.
    assert paths({"time": 1}, {"time": 2}) == ["time"]
    assert paths({"x": {"weird key": 1}}, {"x": {"weird key": 2}}) == ["x['weird key']"]


def test_many_differing_elements_are_counted_not_listed() -> None:
    a = np.zeros(100)
    result = compare(a, a + 1)
    assert len(result.differences) == 5 and result.more == 95 and not result.matches


def test_chat_result_ignores_response_id_and_created() -> None:
    body = sglang("chat_completion.json")
    other = json.loads(json.dumps(body))
    other.update(id="chatcmpl-other", created=body["created"] + 7)
    assert compare(ChatResult.from_json(body), ChatResult.from_json(other)).matches
    other["choices"][0]["message"]["content"] = "Lyon."
    assert paths(ChatResult.from_json(body), ChatResult.from_json(other)) == [
        "text",
        "response.choices[0].message.content",
    ]
