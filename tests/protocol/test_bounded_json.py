"""The one bounded JSON reader: nesting counted outside strings only, and every refusal a
JSONRefused (a ValueError) in words, never a RecursionError or a bare ValueError."""

from __future__ import annotations

import pytest

from protocol.bounded_json import JSON_MAX_DEPTH, JSONRefused, loads, nesting_depth


@pytest.mark.parametrize(
    ("data", "depth"),
    [
        (b"", 0),
        (b"1", 0),
        (b"[]", 1),
        (b'{"a": {"b": [1]}}', 3),
        (b'"[[[["', 0),
        (b'["]]]]", [[]]]', 3),  # closing brackets in a string do not hide depth
        (b'["a\\\\", [[]]]', 3),  # an escaped backslash does not escape the quote after it
        (b'["a\\"]]", []]', 2),  # an escaped quote does not end the string
        (b"]]]", 0),
    ],
)
def test_nesting_is_counted_outside_strings(data: bytes, depth: int) -> None:
    assert nesting_depth(data) == depth


def test_values_within_the_bounds_parse_as_json() -> None:
    deep = "[" * JSON_MAX_DEPTH + "]" * JSON_MAX_DEPTH
    assert loads(deep) is not None
    assert loads('{"a": "[[[[", "b": [1.5, -2e3]}') == {"a": "[[[[", "b": [1.5, -2e3]}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("[" * (JSON_MAX_DEPTH + 1) + "]" * (JSON_MAX_DEPTH + 1), "nested too deeply"),
        ("[" * 100_000, "nested too deeply"),
        ("[" * 2_000 + '"]' + "]" * 2_000, "nested too deeply"),
        ("[NaN]", "NaN is not a finite number"),
        ("[1e99999]", "not a finite number"),
        ("1" * 5_000, "too long"),
        (b"\xff\xfe[", "not valid JSON"),
        ("{not json", "line 1 column 2"),
        ("x" * 2_000, "over the limit of 1 KiB"),
    ],
)
def test_refusals_say_what_was_wrong(data: str | bytes, words: str) -> None:
    with pytest.raises(JSONRefused, match=words) as caught:
        loads(data, limit=1024 if words.startswith("over") else 2**20, what="the body")
    assert str(caught.value).startswith("the body ")
