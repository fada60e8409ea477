"""JSON for the guest server without importing the json package.

PERF: `import json` pulls in re and enum and costs about 7 ms of a fresh
sandbox start on this class of machine, more than the rest of the guest
server together. The C accelerator _json that json itself uses has the
scanner and encoder; this module drives them directly with the same
settings as json.loads and json.dumps. Where _json is missing (another
interpreter), it falls back to the json package.
"""

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None

_WHITESPACE = " \t\n\r"


class _DecodeSettings:
    """The attributes _json.make_scanner reads, as json.loads sets them."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {
        "-Infinity": float("-inf"),
        "Infinity": float("inf"),
        "NaN": float("nan"),
    }.__getitem__
    memo = {}


def _not_serializable(value):
    raise TypeError(
        f"Object of type {type(value).__name__} is not JSON serializable"
    )


if _json is not None:
    _scan = _json.make_scanner(_DecodeSettings)
    _encode = _json.make_encoder(
        {},
        _not_serializable,
        _json.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        True,
    )

    def loads(text):
        """Parse one JSON document; ValueError if it is not one."""
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            value, end = _scan(text, start)
        except StopIteration as stop:
            raise ValueError(
                f"expecting a value at char {stop.value}"
            ) from None
        if text[end:].strip(_WHITESPACE):
            raise ValueError(f"extra data at char {end}")
        return value

    def dumps(value):
        """Encode like json.dumps(value) with default settings."""
        return "".join(_encode(value, 0))

else:  # pragma: no cover
    import json

    loads = json.loads
    dumps = json.dumps
