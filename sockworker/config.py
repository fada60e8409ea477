"""The worker's configuration: typed fields, defaults and validation.

A config file is one JSON object. Every key must be a known field; every
value is checked for type and range when the file is loaded, so a mistake
stops the worker at start with one line that names the file, the field and
what was expected, instead of failing later in the middle of a request.

The field table lives in one place: the `Config` dataclass below, where
each attribute carries its default, its check and its meaning. `FIELDS`
and `config_reference_markdown()` are derived from it, so the README's
configuration reference cannot drift from the code.
"""

import dataclasses
import difflib
import json
import math
import os
import re

__all__ = [
    "FIELDS",
    "Config",
    "ConfigError",
    "Field",
    "config_reference_markdown",
    "load_config",
]

MIB = 1024 * 1024

# A value with a scheme ("http://...") is a URL and is never resolved
# against the config file's directory.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Values shown in error messages are cut to this many characters so that a
# message stays one readable line even for a huge wrong value.
_SHOW_MAX = 60


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line naming the
    source (file), the field and what was expected."""


class _Check:
    """Validates one field's value.

    `type_name` is the type shown in the reference table; `expected` the
    phrase used in messages ("an integer >= 16"). `normalize` returns the
    value to store or `_REJECT`.
    """

    type_name = ""
    expected = ""

    def normalize(self, value):
        raise NotImplementedError


_REJECT = object()


def _is_int(value):
    # bool is a subclass of int in Python, but `true` is not a port number.
    return isinstance(value, int) and not isinstance(value, bool)


class _Integer(_Check):
    type_name = "int"

    def __init__(self, minimum, maximum=None):
        self.minimum = minimum
        self.maximum = maximum
        if maximum is None:
            self.expected = f"an integer >= {minimum}"
        else:
            self.expected = f"an integer {minimum}-{maximum}"

    def normalize(self, value):
        if not _is_int(value) or value < self.minimum:
            return _REJECT
        if self.maximum is not None and value > self.maximum:
            return _REJECT
        return value


class _Number(_Check):
    type_name = "float"

    def __init__(self, minimum, exclusive):
        self.minimum = minimum
        self.exclusive = exclusive
        sign = ">" if exclusive else ">="
        self.expected = f"a finite number {sign} {minimum}"

    def normalize(self, value):
        if not (_is_int(value) or isinstance(value, float)):
            return _REJECT
        value = float(value)
        if not math.isfinite(value):
            return _REJECT
        if value < self.minimum or (self.exclusive and value == self.minimum):
            return _REJECT
        return value


class _Boolean(_Check):
    type_name = "bool"
    expected = "true or false"

    def normalize(self, value):
        return value if isinstance(value, bool) else _REJECT


class _String(_Check):
    type_name = "str"

    def __init__(self, nonempty):
        self.nonempty = nonempty
        self.expected = "a non-empty string" if nonempty else "a string"

    def normalize(self, value):
        if not isinstance(value, str) or (self.nonempty and not value):
            return _REJECT
        return value


class _Choice(_Check):
    type_name = "str"

    def __init__(self, *choices):
        self.choices = choices
        self.expected = "one of " + ", ".join(_quote(c) for c in choices)

    def normalize(self, value):
        return value if value in self.choices else _REJECT


class _Registry(_String):
    """A folder path, or a URL with a scheme the registry can fetch."""

    schemes = ("http", "https", "file")

    def __init__(self):
        super().__init__(nonempty=False)
        self.expected = "a folder path or a file://, http:// or https:// URL"

    def normalize(self, value):
        value = super().normalize(value)
        if value is _REJECT or not _URL_RE.match(value):
            return value
        scheme = value.split(":", 1)[0].lower()
        return value if scheme in self.schemes else _REJECT


def _quote(text):
    return json.dumps(text)


def _show(value):
    """The value as it was written in JSON, cut short for one line."""
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(value)
    if len(shown) > _SHOW_MAX:
        shown = shown[: _SHOW_MAX - 3] + "..."
    return shown


def _option(default, check, doc, *, path=False):
    """One row of the field table, attached to the dataclass attribute."""
    return dataclasses.field(
        default=default,
        metadata={"check": check, "doc": doc, "path": path},
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated worker configuration.

    Every attribute has a default that works on a fresh machine. Building a
    Config checks every value (type and range) and raises ConfigError;
    paths from a file are already absolute when they reach the attributes.
    """

    worker_port: int = _option(
        8080, _Integer(1, 65535), "TCP port the HTTP server listens on."
    )
    registry: str = _option(
        "",
        _Registry(),
        "Where lambda code comes from: a folder, a file:// URL or an "
        'http(s):// URL of a registry. "" means none is configured.',
        path=True,
    )
    sandbox: str = _option(
        "docker",
        _Choice("docker", "sock"),
        'Container backend: "sock" (the worker\'s own containers) or '
        '"docker".',
    )
    log_output: str = _option(
        "stdout",
        _String(nonempty=True),
        'Where logs go: "stdout" or the path of a file to append to.',
        path=True,
    )
    worker_host: str = _option(
        "0.0.0.0",
        _String(nonempty=True),
        "Address the HTTP server binds to.",
    )
    state_dir: str = _option(
        "/var/lib/sockworker",
        _String(nonempty=True),
        "Directory for the worker's state: unpacked code, sandbox "
        "directories.",
        path=True,
    )
    images_dir: str = _option(
        "",
        _String(nonempty=False),
        'Directory of root filesystem images; "" means <state_dir>/images.',
        path=True,
    )
    memory_mb: int = _option(
        256, _Integer(16), "Memory limit of one sandbox, in MiB."
    )
    max_procs: int = _option(
        64, _Integer(4), "Limit on processes and threads in one sandbox."
    )
    cpu_weight: int = _option(
        100,
        _Integer(1, 10000),
        "CPU weight of one sandbox relative to others (100 is the "
        "default share).",
    )
    timeout_seconds: float = _option(
        30.0,
        _Number(0, exclusive=True),
        "Time a handler may run for one request before it gets 504.",
    )
    keep_warm_seconds: float = _option(
        60.0,
        _Number(0, exclusive=False),
        "How long an idle instance is kept before it is destroyed.",
    )
    pause_after_ms: int = _option(
        50,
        _Integer(0),
        "Idle time after which an idle instance is paused (frozen).",
    )
    max_instances_per_lambda: int = _option(
        4, _Integer(1), "Instances one lambda may have at the same time."
    )
    max_instances: int = _option(
        32, _Integer(1), "Instances on the whole worker at the same time."
    )
    queue_per_lambda: int = _option(
        64,
        _Integer(0),
        "Requests that may wait for an instance of one lambda; more get 429.",
    )
    max_body_bytes: int = _option(
        6 * MIB,
        _Integer(1),
        "Largest request body accepted (6 MiB); larger bodies get 413.",
    )
    network: str = _option(
        "none",
        _Choice("none", "host"),
        'Sandbox network: "none" (own namespace, loopback only) or "host" '
        "(share the host's network).",
    )
    registry_refresh_seconds: float = _option(
        5.0,
        _Number(0, exclusive=False),
        "Seconds a lambda's code is reused before the registry is checked "
        "again for a change; 0 checks on every request.",
    )
    max_code_bytes: int = _option(
        64 * MIB,
        _Integer(1),
        "Largest lambda code archive accepted, packed or unpacked (64 MiB).",
    )
    memory_budget_mb: int = _option(
        0,
        _Integer(0),
        "Total memory all instances may have, in MiB; 0 means 3/4 of the "
        "machine's MemTotal.",
    )
    code_cache_mb: int = _option(
        512,
        _Integer(0),
        "Memory for unpacked lambda code, in MiB: a tmpfs at "
        "<state_dir>/lambdas that only the worker sees; 0 keeps the code "
        "on disk there instead.",
    )
    import_cache: bool = _option(
        True,
        _Boolean(),
        "Fork sandboxes from zygotes that have imported the lambda's "
        "packages (the import cache); false starts every sandbox fresh.",
    )
    http_threads: int = _option(
        32, _Integer(1), "Threads serving HTTP requests."
    )

    def __post_init__(self):
        # Direct construction (tests, dataclasses.replace) gets the same
        # checks as a file; float fields accept integers and store floats.
        for field in FIELDS:
            value = _checked(field, getattr(self, field.name), "Config")
            object.__setattr__(self, field.name, value)

    @classmethod
    def from_dict(cls, d, source="<dict>", base_dir=None):
        """Build a Config from a decoded JSON object.

        `source` names the origin in error messages. When `base_dir` is
        given, relative paths (registry folder, log_output, state_dir,
        images_dir) are resolved against it; URLs, "stdout" and "" are kept
        as they are.
        """
        if not isinstance(d, dict):
            raise ConfigError(
                f"{source}: expected a JSON object at the top level, "
                f"got {_json_type(d)}"
            )
        _reject_unknown_keys(d, source)

        values = {}
        for field in FIELDS:
            if field.name not in d:
                continue
            value = _checked(field, d[field.name], source)
            if field.path and base_dir is not None:
                value = _resolve_path(value, base_dir)
            values[field.name] = value
        return cls(**values)

    @property
    def images_path(self):
        """The images directory, defaulting to <state_dir>/images."""
        return self.images_dir or os.path.join(self.state_dir, "images")

    @property
    def registry_is_url(self):
        return bool(_URL_RE.match(self.registry))

    def memory_budget_bytes(self, meminfo_path="/proc/meminfo"):
        """The total memory all instances may have: memory_budget_mb, or
        3/4 of MemTotal when that is 0."""
        if self.memory_budget_mb:
            return self.memory_budget_mb * MIB
        return _mem_total_bytes(meminfo_path) * 3 // 4


@dataclasses.dataclass(frozen=True)
class Field:
    """One configuration field: its name, type, default, check and
    meaning. `path` fields are resolved against the config file's
    directory."""

    name: str
    type: str
    default: object
    check: _Check
    doc: str
    path: bool


FIELDS = tuple(
    Field(
        name=f.name,
        type=f.metadata["check"].type_name,
        default=f.default,
        check=f.metadata["check"],
        doc=f.metadata["doc"],
        path=f.metadata["path"],
    )
    for f in dataclasses.fields(Config)
)

_FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def _checked(field, value, source):
    normalized = field.check.normalize(value)
    if normalized is _REJECT:
        raise ConfigError(
            f"{source}: field {_quote(field.name)}: expected "
            f"{field.check.expected}, got {_show(value)}"
        )
    return normalized


def _reject_unknown_keys(d, source):
    for key in d:
        if key in _FIELDS_BY_NAME:
            continue
        close = difflib.get_close_matches(str(key), _FIELDS_BY_NAME, n=1)
        hint = (
            f"; did you mean {_quote(close[0])}?"
            if close
            else "; see the configuration reference in README.md"
        )
        raise ConfigError(f"{source}: unknown field {_show(key)}{hint}")


def _resolve_path(value, base_dir):
    if not value or value == "stdout" or _URL_RE.match(value):
        return value
    return os.path.normpath(os.path.join(base_dir, value))


def _json_type(value):
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _mem_total_bytes(meminfo_path):
    try:
        with open(meminfo_path, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as e:
        raise ConfigError(
            f"{meminfo_path}: cannot read MemTotal for memory_budget_mb: {e}"
        ) from e
    raise ConfigError(
        f"{meminfo_path}: no MemTotal line for memory_budget_mb; set "
        "memory_budget_mb in the config"
    )


def _no_duplicate_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    pass


def load_config(path):
    """Read, parse and validate the config file at `path`.

    Relative paths inside the file are resolved against the file's
    directory. Raises ConfigError with one line naming `path`.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read config: {e.strerror or e}"
        ) from e

    try:
        # utf-8-sig: editors on some systems start the file with a BOM.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: config is not UTF-8 text: {e.reason} at byte {e.start}"
        ) from e

    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
            f"{e.msg}"
        ) from e
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}: field {_show(e.args[0])} appears more than once"
        ) from e

    base_dir = os.path.dirname(os.path.abspath(path))
    return Config.from_dict(data, source=path, base_dir=base_dir)


def config_reference_markdown():
    """The configuration reference as a markdown table: name | type |
    default | meaning."""
    lines = [
        "| name | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for field in FIELDS:
        default = json.dumps(field.default)
        doc = field.doc.replace("|", "\\|")
        lines.append(
            f"| `{field.name}` | {field.type} | `{default}` | {doc} |"
        )
    return "\n".join(lines) + "\n"
