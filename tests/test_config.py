"""
Configuration validation: every error names the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import pytest

from wingate_map.config import Destination, load_config, parse_config, parse_map_option
from wingate_map.errors import ConfigError


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [str(p) for p in info.value.problems]


def test_minimal_mapping_defaults():
    """
    A mapping needs only a port; everything else has the documented safe default.
    """
    config = parse_config("[mappings.rdp]\nport = 3389\n")
    [m] = config.mappings
    assert (m.name, m.port, m.enabled, m.bind) == ("rdp", 3389, True, ("internal",))
    assert (m.connect_timeout, m.idle_timeout, m.default) == (10.0, 0.0, ())
    assert config.service.drain_timeout == 30.0 and config.service.audit_log is None


def test_full_mapping():
    """
    Every implemented key is read into the model.
    """
    config = parse_config(
        """
        [service]
        drain_timeout = 5
        [interfaces]
        eth0 = "internal"
        eth1 = "dmz"
        [mappings.db]
        port = 5432
        enabled = false
        bind = ["eth0", "10.0.0.1", "::1", "external"]
        connect_timeout = 2.5
        idle_timeout = 600
        default = [{ host = "db1.internal", port = 5432 }, { endpoint = "unix:path=/run/db.sock" }]
        """
    )
    [m] = config.mappings
    assert m.bind == ("eth0", "10.0.0.1", "::1", "external")
    assert m.default == (Destination(host="db1.internal", port=5432), Destination(endpoint="unix:path=/run/db.sock"))
    assert str(m.default[0]) == "db1.internal:5432" and str(m.default[1]) == "unix:path=/run/db.sock"
    assert not m.enabled and m.connect_timeout == 2.5 and m.idle_timeout == 600
    assert config.interface_classes() == {"eth0": "internal", "eth1": "dmz"}
    assert config.enabled_mappings() == ()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[mappings.rdp]\n", "mappings.rdp.port: is required"),
        ("[mappings.rdp]\nport = 0\n", "mappings.rdp.port: 0 is not a valid port; expected an integer 1-65535"),
        ("[mappings.rdp]\nport = 70000\n", "mappings.rdp.port: 70000 is not a valid port"),
        ("[mappings.rdp]\nport = \"3389\"\n", 'mappings.rdp.port: "3389" is not a valid port'),
        ("[mappings.rdp]\nport = true\n", "mappings.rdp.port: true is not a valid port"),
        ("[mappings.rdp]\nport = 1\nenabled = 1\n", "mappings.rdp.enabled: 1 is not allowed; expected true or false"),
        ("[mappings.rdp]\nport = 1\nconnect_timeout = 0\n", "mappings.rdp.connect_timeout: 0 is out of range; expected a number of seconds > 0"),
        ("[mappings.rdp]\nport = 1\nidle_timeout = -1\n", "mappings.rdp.idle_timeout: -1 is out of range"),
        ("[mappings.rdp]\nport = 1\nbind = []\n", "mappings.rdp.bind: an empty list is not allowed"),
        ("[mappings.rdp]\nport = 1\nbind = \"in ternal\"\n", 'mappings.rdp.bind: "in ternal" is not a usage class'),
        ("[mappings.rdp]\nport = 1\nbind = [3]\n", "mappings.rdp.bind[0]: 3 is not allowed"),
        ("[mappings.rdp]\nport = 1\ndefault = { host = \"a\" }\n", "mappings.rdp.default.port: is required"),
        ("[mappings.rdp]\nport = 1\ndefault = { port = 1 }\n", "mappings.rdp.default.host: is required (or give endpoint)"),
        ("[mappings.rdp]\nport = 1\ndefault = { host = \"bad host\", port = 1 }\n", 'mappings.rdp.default.host: "bad host" is not a host name or IP address'),
        ("[mappings.rdp]\nport = 1\ndefault = [{ host = \"a\", port = 0 }]\n", "mappings.rdp.default[0].port: 0 is not a valid port"),
        ("[mappings.rdp]\nport = 1\ndefault = []\n", "mappings.rdp.default: an empty list is not allowed"),
        ("[mappings.rdp]\nport = 1\ndefault = 80\n", "mappings.rdp.default: must be \"host:port\" or a table"),
        ("[mappings.rdp]\nport = 1\ndefault = { endpoint = \"nonsense:x\" }\n", 'mappings.rdp.default.endpoint: "nonsense:x" is not a valid client endpoint'),
        ("[mappings.rdp]\nport = 1\ndefault = { endpoint = \"tcp:a:80\", host = \"a\" }\n", "mappings.rdp.default: give either endpoint or host and port, not both"),
        ("[mappings.rdp]\nprot = 1\n", 'mappings.rdp.prot: unknown key (did you mean "port"?)'),
        ("[mapings.rdp]\nport = 1\n", 'mapings: unknown key (did you mean "mappings"?)'),
        ("[mappings.rdp]\nport = 1\ndefault = { host = \"a\", port = 1, hots = 2 }\n", 'mappings.rdp.default.hots: unknown key (did you mean "host"?)'),
        ("[service]\ndrain_timeout = \"30s\"\n", 'service.drain_timeout: "30s" is not allowed; expected a number of seconds >= 0'),
        ("[service]\naudit_log = \"/nonexistent-dir/x.jsonl\"\n", 'service.audit_log: "/nonexistent-dir/x.jsonl": directory /nonexistent-dir does not exist'),
        ("[interfaces]\neth0 = \"inside\"\n", 'interfaces.eth0: "inside" is not a usage class; expected one of internal, external, dmz'),
        ("[mappings.\"r d p\"]\nport = 1\n", "mappings.r d p: a mapping name may use only letters"),
        ("mappings = 3\n", "mappings: must be a table, not 3"),
        ("[service]\nworkers = 0\n", "service.workers: 0 is not a valid number of worker processes; expected an integer 1-64"),
        ("[mappings.rdp]\nport = 1\nmax_connections = -1\n", "mappings.rdp.max_connections: -1 is not a valid connection limit"),
        ("[admin]\nlisten = \"tcp:8780\"\n", "admin.token: is required when admin.listen (tcp:8780) is not loopback-only"),
        ("[admin]\nlisten = \"bogus:1\"\n", 'admin.listen: "bogus:1" is not a valid server endpoint string'),
        ("[[events.ClientConnect]]\nrun = [\"/nonexistent/prog\"]\n", 'events.ClientConnect[0].run: "/nonexistent/prog" is not an executable program'),
        ("[[events.ClientConnect]]\npython = \"nosuchmodule:fn\"\n", 'events.ClientConnect[0].python: "nosuchmodule:fn": cannot import nosuchmodule'),
        ("[[events.ClientConnect]]\nrun = [\"/bin/true\"]\non_failure = \"maybe\"\n", 'events.ClientConnect[0].on_failure: "maybe" is not allowed'),
        ("[[events.ClientConnect]]\ntimeout = 3\n", "events.ClientConnect[0]: give exactly one of run"),
        ("[events]\nClientConnected = []\n", 'events.ClientConnected: unknown key (did you mean "ClientConnect"?)'),
        ("[mappings.rdp]\nport = 1\nintercept = [1]\n", "mappings.rdp.intercept: includes the mapping's own port 1"),
        ("[mappings.rdp]\nport = 1\nintercept = [\"9-3\"]\n", 'mappings.rdp.intercept[0]: "9-3" is not a valid range'),
        ("[mappings.rdp]\nport = 1\nintercept_transparent = true\n", "mappings.rdp.intercept_transparent: needs intercept ports"),
        ("[mappings.a]\nport = 1\nintercept = [7]\n[mappings.b]\nport = 7\n", "mappings.b.port: port 7 is also mapping a's intercept port on overlapping bindings"),
        ("[mappings.rdp]\nport = 1\ntls = { cert = \"/nonexistent.pem\" }\n", "mappings.rdp.tls.cert: cannot read /nonexistent.pem: No such file or directory"),
        ("[mappings.rdp\nport = 1\n", "<string>: not valid TOML"),
    ],
)
def test_each_error(text, expected):
    """
    Each kind of mistake is reported with its key path and what is allowed.
    """
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_all_errors_reported_at_once():
    """
    Every problem in a file is reported, not just the first.
    """
    found = problems(
        """
        [service]
        drain_timeout = -1
        [mappings.a]
        port = 0
        [mappings.b]
        port = 80
        bind = 7
        [mappings.c]
        colour = "blue"
        """
    )
    paths = [p.split(":")[0] for p in found]
    assert paths == ["service.drain_timeout", "mappings.a.port", "mappings.b.bind", "mappings.c.colour", "mappings.c.port"]


def test_relative_audit_log_is_next_to_the_file(tmp_path):
    """
    A relative audit_log path is resolved against the configuration file's directory.
    """
    path = tmp_path / "wingatemap.toml"
    path.write_text('[service]\naudit_log = "events.jsonl"\n')
    assert load_config(str(path)).service.audit_log == str(tmp_path / "events.jsonl")


def test_unreadable_file(tmp_path):
    """
    A file that cannot be read is one clear error naming it.
    """
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert f"{tmp_path}: cannot read configuration: Is a directory" in str(info.value)


@pytest.mark.parametrize(
    "text, port, bind, host, dport",
    [
        ("8080=db.internal:5432", 8080, ("internal",), "db.internal", 5432),
        ("127.0.0.1:8080=10.0.0.1:80", 8080, ("127.0.0.1",), "10.0.0.1", 80),
        ("[::1]:8080=[fd00::1]:80", 8080, ("::1",), "fd00::1", 80),
        ("eth0:22=10.0.0.2:22", 22, ("eth0",), "10.0.0.2", 22),
    ],
)
def test_map_option(text, port, bind, host, dport):
    """
    --map [ADDRESS:]PORT=HOST:PORT builds a mapping with a default destination.
    """
    m = parse_map_option(text)
    assert (m.port, m.bind, m.default) == (port, bind, (Destination(host=host, port=dport),))


@pytest.mark.parametrize("text", ["8080", "8080=db", "0=db:1", "8080=db:99999", "x:y:z=db:1", "8080=bad host:1"])
def test_bad_map_option(text):
    """
    A malformed --map names itself and the expected form.
    """
    with pytest.raises(ConfigError) as info:
        parse_map_option(text)
    assert str(info.value).startswith(f"--map {text}: ")


ADMIN = '[admin]\nlisten = "tcp:0:interface=127.0.0.1"\n'


def test_token_file_first_line(tmp_path):
    """
    admin.token_file gives the token on its first line, surrounding whitespace stripped.
    """
    secret = tmp_path / "token"
    secret.write_text("  s3cret-token-value \nignored second line\n")
    secret.chmod(0o600)
    config = parse_config(ADMIN + f'token_file = "{secret}"\n')
    assert config.admin.token == "s3cret-token-value"
    assert config.admin.token_file == str(secret)
    assert config.warnings == ()


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "admin.token_file: cannot read"),
        ("\n", "admin.token_file: " + "{path}: the first line is empty"),
        ("short\n", "admin.token_file: {path}: the token must be at least 8 characters"),
        (b"\xff\xfe\n", "admin.token_file: {path}: the first line is not UTF-8 text"),
    ],
)
def test_bad_token_file(tmp_path, content, expected):
    """
    A missing, empty, too short or undecodable token file is an error naming admin.token_file.
    """
    secret = tmp_path / "token"
    if isinstance(content, bytes):
        secret.write_bytes(content)
    elif content is not None:
        secret.write_text(content)
    [problem] = problems(ADMIN + f'token_file = "{secret}"\n')
    assert problem.startswith(expected.format(path=secret))


def test_token_and_token_file_both(tmp_path):
    """
    Giving both token and token_file is an error: which one wins would be a guess.
    """
    secret = tmp_path / "token"
    secret.write_text("s3cret-token-value\n")
    [problem] = problems(ADMIN + f'token = "another-token"\ntoken_file = "{secret}"\n')
    assert problem == "admin.token_file: give either admin.token or admin.token_file, not both"


def test_world_readable_token_warned(tmp_path):
    """
    A token in a file every user can read is allowed but warned about, naming the file and the fix.
    """
    secret = tmp_path / "token"
    secret.write_text("s3cret-token-value\n")
    secret.chmod(0o644)
    [warning] = parse_config(ADMIN + f'token_file = "{secret}"\n').warnings
    assert str(warning).startswith("admin.token_file: ") and "readable by every user (mode 0644)" in str(warning)
    config_file = tmp_path / "wingatemap.toml"
    config_file.write_text(ADMIN + 'token = "s3cret-token-value"\n')
    config_file.chmod(0o644)
    [warning] = load_config(str(config_file)).warnings
    assert str(warning).startswith("admin.token: ") and f"chmod o-r {config_file}" in str(warning)
    config_file.chmod(0o640)
    assert load_config(str(config_file)).warnings == ()


def test_repeated_interface_not_loopback():
    """
    tcp:PORT:interface=127.0.0.1:interface=0.0.0.0 binds 0.0.0.0 (the last one wins): it needs a token.
    """
    [problem] = problems('[admin]\nlisten = "tcp:8785:interface=127.0.0.1:interface=0.0.0.0"\n')
    assert problem.startswith("admin.token: is required when admin.listen")


def test_max_running():
    """
    events.max_running defaults to 64 and must be a positive integer.
    """
    assert parse_config("").max_running == 64
    assert parse_config("[events]\nmax_running = 2\n").max_running == 2
    [problem] = problems("[events]\nmax_running = 0\n")
    assert problem.startswith("events.max_running: 0 is not a valid")


def test_host_port_string_destinations():
    """
    A destination may be written "host:port" or "[v6]:port", in default and in a rule's to.
    """
    config = parse_config(
        '[mappings.rdp]\nport = 3389\ndefault = ["10.0.0.10:3389", "[fd00::10]:3389"]\n'
        '[[mappings.rdp.rules]]\nfrom = ["10.0.1.0/24"]\nto = "rdp.corp.example:3390"\n'
    )
    [m] = config.mappings
    assert m.default == (Destination(host="10.0.0.10", port=3389), Destination(host="fd00::10", port=3389))
    assert str(m.default[1]) == "[fd00::10]:3389"
    assert m.rules[0].to == (Destination(host="rdp.corp.example", port=3390),)


@pytest.mark.parametrize(
    "value, expected",
    [
        ('"10.0.0.10"', 'mappings.a.default: "10.0.0.10" is not a destination; expected "host:port"'),
        ('"fd00::1:80"', 'mappings.a.default: "fd00::1:80" is not a destination'),
        ('"10.0.0.10:0"', 'mappings.a.default: "10.0.0.10:0": the port must be an integer 1-65535'),
        ('"bad host:80"', "mappings.a.default: \"bad host:80\": 'bad host' is not a host name or IP address"),
    ],
)
def test_bad_host_port_string(value, expected):
    """
    A destination string that is not host:port says what to write instead.
    """
    [problem] = problems(f"[mappings.a]\nport = 1\ndefault = {value}\n")
    assert problem.startswith(expected)


@pytest.mark.parametrize(
    "listen, hint",
    [
        ("127.0.0.1:9090", "tcp:9090:interface=127.0.0.1"),
        ("9090", "tcp:9090:interface=127.0.0.1"),
        ("[::1]:9090", "tcp6:9090:interface=\\\\:\\\\:1"),
    ],
)
def test_admin_listen_hint(listen, hint):
    """
    admin.listen written as address:port names the endpoint string to write instead.
    """
    [problem] = problems(f'[admin]\nlisten = "{listen}"\n')
    assert problem == f'admin.listen: "{listen}" is not a Twisted server endpoint string; write "{hint}"'


def test_missing_file_points_at_examples(tmp_path):
    """
    A missing configuration file says how to get one.
    """
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "wingatemap.toml"))
    [problem] = info.value.problems
    assert "no such configuration file" in str(problem) and "docs/examples/" in str(problem) and "--map" in str(problem)
