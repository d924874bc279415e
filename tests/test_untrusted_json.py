"""Reading JSON the daemon does not trust: an object or None, never an exception."""

from enpire.untrusted_json import MAX_DEPTH, finite, json_object, typed_get


def test_json_object_is_an_object_or_none():
    assert json_object(b'{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert json_object('{"a": ' + nested + "}") is not None  # exactly MAX_DEPTH levels
    assert json_object('{"a": [' + nested + "]}") is None  # one more
    for data in (b"[" * 100_000, b'{"a": ' * 100_000, b"[1]", b'"s"', b"null", b"", b"\xff", "{\ud800}"):
        assert json_object(data) is None, data[:10]


def test_typed_get_and_finite():
    obj = {"s": "x", "n": 3, "b": True, "f": 1.5, "l": [1]}
    assert [typed_get(obj, k, int, 0) for k in ("n", "b", "s", "missing")] == [3, 0, 0, 0]
    assert typed_get(obj, "b", bool) is True and typed_get(obj, "l", dict, {}) == {}
    assert [finite(v) for v in (1.5, 3, True, float("nan"), float("inf"), 10**400, "1", None)] == [
        1.5, 3.0, None, None, None, None, None, None]
