import dataclasses
import json
import os

import pytest

from sockworker.config import (
    FIELDS,
    MIB,
    Config,
    ConfigError,
    config_reference_markdown,
    load_config,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def write_config(tmp_path, content, name="config.json"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return str(path)


def config_error(tmp_path, content):
    path = write_config(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(path + ": ")
    return message[len(path) + 2 :]


# Defaults


def test_defaults_match_the_documented_table():
    config = Config()
    assert config.worker_port == 8080
    assert config.registry == ""
    assert config.sandbox == "docker"
    assert config.log_output == "stdout"
    assert config.worker_host == "0.0.0.0"
    assert config.state_dir == "/var/lib/sockworker"
    assert config.images_dir == ""
    assert config.images_path == "/var/lib/sockworker/images"
    assert config.memory_mb == 256
    assert config.max_procs == 64
    assert config.cpu_weight == 100
    assert config.timeout_seconds == 30.0
    assert config.keep_warm_seconds == 60.0
    assert config.pause_after_ms == 50
    assert config.max_instances_per_lambda == 4
    assert config.max_instances == 32
    assert config.queue_per_lambda == 64
    assert config.max_body_bytes == 6 * MIB
    assert config.network == "none"
    assert config.registry_refresh_seconds == 5.0
    assert config.max_code_bytes == 64 * MIB
    assert config.memory_budget_mb == 0
    assert config.import_cache is True
    assert config.http_threads == 32


def test_empty_object_gives_defaults(tmp_path):
    assert load_config(write_config(tmp_path, {})) == Config()


def test_every_default_passes_its_own_check():
    for field in FIELDS:
        assert field.check.normalize(field.default) == field.default


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().worker_port = 1


def test_float_fields_store_floats(tmp_path):
    config = load_config(write_config(tmp_path, {"timeout_seconds": 2}))
    assert config.timeout_seconds == 2.0
    assert isinstance(config.timeout_seconds, float)


def test_values_are_read(tmp_path):
    path = write_config(
        tmp_path,
        {
            "worker_port": 9000,
            "sandbox": "sock",
            "network": "host",
            "import_cache": False,
            "memory_mb": 16,
            "cpu_weight": 10000,
            "keep_warm_seconds": 0,
            "queue_per_lambda": 0,
        },
    )
    config = load_config(path)
    assert config.worker_port == 9000
    assert config.sandbox == "sock"
    assert config.network == "host"
    assert config.import_cache is False
    assert config.memory_mb == 16
    assert config.cpu_weight == 10000
    assert config.keep_warm_seconds == 0.0
    assert config.queue_per_lambda == 0


# Errors: one line each, naming file, field and expectation


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.json")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: cannot read config: No such file or directory"
    )
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_unreadable_path(tmp_path):
    # A directory fails at open() like an unreadable file would (as root,
    # permission bits cannot make a file unreadable).
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read config: Is a directory"


def test_bad_json_names_line_and_column(tmp_path):
    message = config_error(tmp_path, '{\n  "worker_port": 8080\n  "x": 1\n}')
    assert message == (
        "invalid JSON at line 3 column 3: Expecting ',' delimiter"
    )


def test_empty_file_is_bad_json(tmp_path):
    message = config_error(tmp_path, "")
    assert message == "invalid JSON at line 1 column 1: Expecting value"


def test_not_utf8(tmp_path):
    message = config_error(tmp_path, b'{"registry": "\xff"}')
    assert message == "config is not UTF-8 text: invalid start byte at byte 14"


def test_utf8_bom_is_accepted(tmp_path):
    path = write_config(tmp_path, b'\xef\xbb\xbf{"worker_port": 81}')
    assert load_config(path).worker_port == 81


@pytest.mark.parametrize(
    "content, got",
    [("[1, 2]", "an array"), ('"x"', "a string"), ("null", "null")],
)
def test_top_level_not_an_object(tmp_path, content, got):
    message = config_error(tmp_path, content)
    assert message == f"expected a JSON object at the top level, got {got}"


def test_unknown_key_suggests_closest(tmp_path):
    message = config_error(tmp_path, {"worker_prot": 8080})
    assert (
        message == 'unknown field "worker_prot"; did you mean "worker_port"?'
    )


def test_unknown_key_without_close_match(tmp_path):
    message = config_error(tmp_path, {"zzz": 1})
    assert message == (
        'unknown field "zzz"; see the configuration reference in README.md'
    )


def test_duplicate_key(tmp_path):
    message = config_error(tmp_path, '{"worker_port": 1, "worker_port": 2}')
    assert message == 'field "worker_port" appears more than once'


def test_brief_example_message(tmp_path):
    message = config_error(tmp_path, {"worker_port": "80a"})
    assert message == (
        'field "worker_port": expected an integer 1-65535, got "80a"'
    )


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("worker_port", 0, "an integer 1-65535"),
        ("worker_port", 65536, "an integer 1-65535"),
        ("worker_port", 8080.0, "an integer 1-65535"),
        ("worker_port", True, "an integer 1-65535"),
        ("memory_mb", 15, "an integer >= 16"),
        ("max_procs", 3, "an integer >= 4"),
        ("cpu_weight", 0, "an integer 1-10000"),
        ("cpu_weight", 10001, "an integer 1-10000"),
        ("timeout_seconds", 0, "a finite number > 0"),
        ("timeout_seconds", "30", "a finite number > 0"),
        ("timeout_seconds", False, "a finite number > 0"),
        ("keep_warm_seconds", -1, "a finite number >= 0"),
        ("pause_after_ms", -1, "an integer >= 0"),
        ("max_instances_per_lambda", 0, "an integer >= 1"),
        ("max_instances", 0, "an integer >= 1"),
        ("queue_per_lambda", -1, "an integer >= 0"),
        ("max_body_bytes", 0, "an integer >= 1"),
        ("registry_refresh_seconds", -0.5, "a finite number >= 0"),
        ("max_code_bytes", 0, "an integer >= 1"),
        ("memory_budget_mb", -1, "an integer >= 0"),
        ("http_threads", 0, "an integer >= 1"),
        ("import_cache", 1, "true or false"),
        ("import_cache", "yes", "true or false"),
        ("sandbox", "runc", 'one of "docker", "sock"'),
        ("network", "bridge", 'one of "none", "host"'),
        (
            "registry",
            5,
            "a folder path or a file://, http:// or https:// URL",
        ),
        (
            "registry",
            "ftp://host/lambdas",
            "a folder path or a file://, http:// or https:// URL",
        ),
        ("log_output", "", "a non-empty string"),
        ("worker_host", None, "a non-empty string"),
        ("state_dir", "", "a non-empty string"),
        ("images_dir", [], "a string"),
    ],
)
def test_wrong_type_or_range(tmp_path, field, value, expected):
    message = config_error(tmp_path, {field: value})
    got = json.dumps(value)
    assert message == f'field "{field}": expected {expected}, got {got}'


def test_non_finite_number_is_rejected(tmp_path):
    # Python's json accepts these literals; a timeout of Infinity is not a
    # timeout.
    for literal in ("Infinity", "NaN"):
        message = config_error(tmp_path, '{"timeout_seconds": %s}' % literal)
        assert message == (
            'field "timeout_seconds": expected a finite number > 0, '
            f"got {literal}"
        )


def test_long_wrong_value_is_cut_short(tmp_path):
    message = config_error(tmp_path, {"worker_port": "x" * 500})
    assert message == (
        'field "worker_port": expected an integer 1-65535, got "'
        + "x" * 56
        + "..."
    )


def test_from_dict_names_its_source():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"memory_mb": 1}, source="env")
    assert str(info.value) == (
        'env: field "memory_mb": expected an integer >= 16, got 1'
    )
    with pytest.raises(ConfigError) as info:
        Config.from_dict([])
    assert str(info.value) == (
        "<dict>: expected a JSON object at the top level, got an array"
    )


def test_direct_construction_is_checked():
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(Config(), max_instances=0)
    assert str(info.value) == (
        'Config: field "max_instances": expected an integer >= 1, got 0'
    )


# Paths


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write_config(
        sub,
        {
            "registry": "../registry",
            "log_output": "logs/worker.log",
            "state_dir": "state",
            "images_dir": "./images",
        },
    )
    config = load_config(path)
    assert config.registry == str(tmp_path / "registry")
    assert config.log_output == str(sub / "logs" / "worker.log")
    assert config.state_dir == str(sub / "state")
    assert config.images_dir == str(sub / "images")
    assert config.images_path == str(sub / "images")


def test_relative_config_path_resolves_against_its_directory(
    tmp_path, monkeypatch
):
    write_config(tmp_path, {"state_dir": "s"})
    monkeypatch.chdir(tmp_path)
    assert load_config("config.json").state_dir == str(tmp_path / "s")


def test_special_values_are_not_resolved(tmp_path):
    path = write_config(
        tmp_path,
        {
            "registry": "http://registry.example:5000/lambdas",
            "log_output": "stdout",
            "images_dir": "",
            "state_dir": "/srv/sockworker",
        },
    )
    config = load_config(path)
    assert config.registry == "http://registry.example:5000/lambdas"
    assert config.registry_is_url
    assert config.log_output == "stdout"
    assert config.images_dir == ""
    assert config.state_dir == "/srv/sockworker"
    assert config.images_path == "/srv/sockworker/images"


def test_file_url_registry_is_kept(tmp_path):
    config = load_config(
        write_config(tmp_path, {"registry": "file:///srv/lambdas"})
    )
    assert config.registry == "file:///srv/lambdas"


def test_empty_registry_stays_empty(tmp_path):
    config = load_config(write_config(tmp_path, {"registry": ""}))
    assert config.registry == ""
    assert not config.registry_is_url


def test_from_dict_without_base_dir_keeps_paths():
    config = Config.from_dict({"state_dir": "rel", "registry": "reg"})
    assert config.state_dir == "rel"
    assert config.registry == "reg"


# The shipped config and the reference


def test_shipped_config_loads():
    path = os.path.join(REPO, "config.json")
    config = load_config(path)
    assert config.worker_port == 8080
    assert config.sandbox == "sock"
    assert config.log_output == "stdout"
    assert config.state_dir == "/var/lib/sockworker"
    assert config.registry == os.path.join(REPO, "examples", "registry")


def test_reference_has_a_row_per_field():
    table = config_reference_markdown().splitlines()
    assert table[0] == "| name | type | default | meaning |"
    rows = table[2:]
    assert len(rows) == len(FIELDS) == len(dataclasses.fields(Config))
    for row, field in zip(rows, FIELDS, strict=True):
        assert row.startswith(f"| `{field.name}` | {field.type} |")
        assert field.doc
    assert any(
        r.startswith("| `import_cache` | bool | `true` |") for r in rows
    )
    assert any(
        r.startswith("| `max_body_bytes` | int | `6291456` |") for r in rows
    )


def test_memory_budget(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        4000000 kB\nMemFree: 1 kB\n")
    assert Config().memory_budget_bytes(str(meminfo)) == 3072000000
    explicit = Config(memory_budget_mb=100)
    assert explicit.memory_budget_bytes(str(meminfo)) == 100 * MIB
    meminfo.write_text("MemFree: 1 kB\n")
    with pytest.raises(ConfigError, match="no MemTotal line"):
        Config().memory_budget_bytes(str(meminfo))
