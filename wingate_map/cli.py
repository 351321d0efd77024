"""
The C{wingatemap} command: C{run} (the twistd form, for people who do not know twistd),
C{check} (validate and print every listener, mapping and rule) and C{explain} (who a client is
and where it would go).
"""

from __future__ import annotations

import argparse
import sys

from .network import plan_listeners
from .config import DEFAULT_CONFIG_PATH, Config
from .errors import ConfigError, WingateMapError
from .version import version

EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wingatemap", description="WinGate-style TCP mapping service")
    parser.add_argument("--version", action="version", version=f"wingatemap {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run every enabled mapping (same as twistd -n wingatemap run)")
    check = commands.add_parser("check", help="validate the configuration and print listeners and mappings")
    explain = commands.add_parser("explain", help="show who CLIENT_IP is, which rule matches and why, and its destination")
    rules = commands.add_parser("intercept-rules", help="print the nftables ruleset transparent interception needs")
    sessions = commands.add_parser("sessions", help="list live sessions (through the admin API)")
    sessions.add_argument("--json", action="store_true", help="print the admin API's JSON objects instead of a table")
    sessions.add_argument("--cluster", action="store_true", help="every gateway's sessions ([cluster]), each with its node")
    sessions.add_argument("--mapping", metavar="NAME", help="only sessions of this mapping")
    sessions.add_argument("--client", metavar="ADDRESS", help="only sessions of this client IP address (or network, e.g. 10.0.1.0/24)")
    sessions.add_argument("--user", metavar="NAME", help="only sessions of this user")
    kill = commands.add_parser("kill", help="end live sessions (through the admin API)")
    kill.add_argument("sessions", nargs="+", metavar="ID", help="session ids, as sessions lists them")
    reload = commands.add_parser("reload", help="ask the running service to re-read its configuration (through the admin API)")
    destinations = commands.add_parser("destinations", help="show each destination's health, up or down (through the admin API)")
    destinations.add_argument("--json", action="store_true", help="print the admin API's JSON objects instead of one line per destination")
    destinations.add_argument("--mapping", metavar="NAME", help="only destinations of this mapping")
    for sub in (sessions, kill, reload, destinations):
        sub.add_argument("--config", "-c", default=None, help=f"configuration file with [admin] (default ./{DEFAULT_CONFIG_PATH})")
    for sub in (run, check, explain, rules):
        sub.add_argument("--config", "-c", default=None, help=f"configuration file (default ./{DEFAULT_CONFIG_PATH})")
        sub.add_argument("--map", action="append", default=[], metavar="[ADDRESS:]PORT=HOST:PORT", help="a quick mapping (repeatable)")
    explain.add_argument("mapping", metavar="MAPPING", help="the mapping's name")
    explain.add_argument("client_ip", metavar="CLIENT_IP", help="the client's IP address")
    explain.add_argument("--sni", metavar="NAME", help="the server name the client asks for in its TLS ClientHello")
    explain.add_argument("--at", metavar="TIME", help="ask about this moment instead of now (ISO 8601, e.g. 2024-03-31T08:30, in [service] timezone)")
    return parser


def _run(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run

    argv = ["twistd", "--nodaemon", "--pidfile=", "wingatemap", "run"]
    if args.config:
        argv += ["--config", args.config]
    for item in args.map:
        argv += ["--map", item]
    sys.argv = argv
    run()
    return 0


def describe(config: Config) -> list[str]:
    """
    The lines C{check} prints for a valid configuration.
    """
    lines = [f"{config.source}: OK", "listeners:"]
    binding_warnings: list[str] = []
    listeners = plan_listeners(config, warnings=binding_warnings)
    for listener in listeners:
        kind = " (intercept)" if listener.intercept else ""
        lines.append(f"  {listener} -> {listener.mapping}{kind}")
    lines.append("mappings:")
    for mapping in config.mappings:
        if not mapping.enabled:
            lines.append(f"  {mapping.name}: disabled")
            continue
        lines.append(f"  {mapping.name}: port {mapping.port}, bind {', '.join(mapping.bind)}, connect_timeout {mapping.connect_timeout:g}s, idle_timeout {mapping.idle_timeout:g}s")
        if mapping.intercept:
            how = ", transparently (connections to any host)" if mapping.intercept_transparent else ""
            lines.append(f"    intercepts port(s) {_ports_text(mapping.intercept)}{how}")
        if mapping.proxy_protocol:
            trusted = ", ".join(str(l) for l in mapping.proxy_protocol_from) if mapping.proxy_protocol_from else "any peer"
            lines.append(f"    expects a PROXY header from {trusted}")
        for rule in mapping.rules:
            lines.append(f"    rule {rule.index}: {rule.conditions()} {rule.outcome()}")
        if mapping.default:
            lines.append(f"    default -> {' | '.join(str(d) for d in mapping.default)}")
        else:
            lines.append("    default -> (none: unmatched clients are refused)")
    if config.users:
        lines.append("users (checked in this order):")
        for user in config.users:
            groups = f" groups {', '.join(user.groups)}" if user.groups else ""
            places = ", ".join(str(l) for l in user.locations) or "(no locations)"
            lines.append(f"  {user.name}: {places}{groups}")
    if config.admin is not None:
        lines.append(f"admin API: {config.admin.listen} ({'bearer token set' if config.admin.token else 'no token: loopback only'})")
    if config.service.workers > 1:
        lines.append(f"workers: {config.service.workers} processes sharing the listeners")
    for handler in config.handlers:
        failure = f", on_failure {handler.on_failure}" if handler.event == "ClientConnect" else ""
        lines.append(f"handler {handler} timeout {handler.timeout:g}s{failure}")
    for warning in list(config.warnings) + binding_warnings:
        lines.append(f"warning: {warning}")
    return lines


def _ports_text(ports: tuple[int, ...]) -> str:
    from .network import port_set as _port_set

    return _port_set(ports).strip("{} ")


def _intercept_rules(args: argparse.Namespace) -> int:
    from .network import plan_listeners
    from .network import redirects, ruleset
    from .tap import build_config

    try:
        config = build_config(args.config, args.map, check_bindings=False)
        listeners = plan_listeners(config, warnings=[])
    except WingateMapError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    if not any(m.intercept_transparent for m in config.enabled_mappings()):
        print("# no enabled mapping has intercept_transparent = true: no rules needed", file=sys.stderr)
    print(f"# nftables ruleset for transparent interception ({config.source}), for this machine's adapters now.")
    print("# Apply with: nft -f FILE   (wingatemap installs and removes it itself when it runs as root)")
    print(ruleset(redirects(config, listeners)), end="")
    return 0


def _admin_request(config_path: str | None, method: str, path: str) -> tuple[int, object]:
    """
    One request to the admin API named by the configuration's C{[admin]}.
    """
    import http.client
    import json
    import re
    import socket as socket_module

    from .config import load_config

    config = load_config(config_path or DEFAULT_CONFIG_PATH)
    if config.admin is None:
        raise WingateMapError(f"{config.source} has no [admin] table: the admin API is off")
    listen = config.admin.listen
    headers = {"Authorization": f"Bearer {config.admin.token}"} if config.admin.token else {}
    if listen.startswith("unix:"):
        match = re.match(r"unix:(?:address=)?((?:\\:|[^:])+)", listen)
        assert match is not None
        socket_path = match.group(1).replace("\\:", ":")

        class UnixConnection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
                self.sock.settimeout(self.timeout)
                self.sock.connect(socket_path)

        connection: http.client.HTTPConnection = UnixConnection("localhost", timeout=30)
    else:
        port_match = re.match(r"tcp6?:(?:port=)?(\d+)", listen)
        if port_match is None:
            raise WingateMapError(f"admin.listen {listen!r}: only tcp and unix endpoints can be reached by this command")
        interface = re.search(r":interface=((?:\\:|[^:])*)", listen)
        host = interface.group(1).replace("\\:", ":") if interface else "127.0.0.1"
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        connection = http.client.HTTPConnection(host, int(port_match.group(1)), timeout=30)
        # The admin API accepts its own address or localhost as Host (DNS-rebinding check).
        headers["Host"] = f"localhost:{port_match.group(1)}"
    try:
        connection.request(method, path, body=b"" if method in ("POST", "PUT", "DELETE") else None, headers=headers)
        response = connection.getresponse()
        body = response.read()
    except OSError as e:
        raise WingateMapError(f"cannot reach the admin API at {listen}: {e}") from None
    finally:
        connection.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body.decode("utf-8", "replace")


def _sessions(args: argparse.Namespace) -> int:
    try:
        status, body = _admin_request(args.config, "GET", "/sessions?scope=cluster" if args.cluster else "/sessions")
    except (ConfigError, WingateMapError) as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    from .printable import printable

    if status != 200 or not isinstance(body, list):
        print(f"admin API answered {status}: {printable(body)}", file=sys.stderr)
        return 1
    try:
        body = [s for s in body if _selected(s, args)]
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    columns = ["session", "mapping", "client", "user", "destination", "duration", "from_client", "to_client"]
    if args.cluster:
        columns.insert(1, "node")
    rows = []
    for s in body:
        client = f"[{s['client_ip']}]:{s['client_port']}" if ":" in s["client_ip"] else f"{s['client_ip']}:{s['client_port']}"
        duration = s.get("duration")
        row = [s["session"], s["mapping"], client, f"{s['user']} ({s['identity']})", s["destination"] or "-",
               f"{duration:.1f}s" if isinstance(duration, (int, float)) else "-", str(s.get("bytes_from_client", "-")), str(s.get("bytes_to_client", "-"))]
        if args.cluster:
            row.insert(1, str(s.get("node") or "-"))
        rows.append(row)
    _print_listing(body, args.json, columns, rows, "(no live sessions)")
    return 0


def _print_listing(items: list[object], as_json: bool, columns: list[str], rows: list[list[str]], empty: str) -> None:
    """
    Print the admin API's C{items} as JSON, or as a table of C{rows} under C{columns}.
    """
    from .printable import printable

    if as_json:
        import json

        print(json.dumps(items, indent=2))
        return
    # Addresses, users, names and errors can come from clients and servers: escaped, so that no
    # control character or escape sequence reaches the terminal.
    table = [columns] + [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not items:
        print(empty)


def _selected(session: dict[str, object], args: argparse.Namespace) -> bool:
    """
    Whether C{session} passes the C{--mapping}, C{--client} and C{--user} filters.
    """
    import ipaddress

    if args.mapping is not None and session.get("mapping") != args.mapping:
        return False
    if args.user is not None and session.get("user") != args.user:
        return False
    if args.client is not None:
        try:
            network = ipaddress.ip_network(args.client, strict=False)
        except ValueError:
            raise ValueError(f"--client {args.client!r} is not an IP address or network") from None
        try:
            return ipaddress.ip_address(str(session.get("client_ip"))) in network
        except ValueError:
            return False
    return True


def _kill(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from .printable import printable

    failed = 0
    for session in args.sessions:
        try:
            status, body = _admin_request(args.config, "DELETE", f"/sessions/{quote(session, safe='')}")
        except (ConfigError, WingateMapError) as e:
            print(str(e), file=sys.stderr)
            return EXIT_INVALID
        if status == 200:
            print(f"killed {printable(session)}")
            continue
        failed += 1
        why = body.get("error") if isinstance(body, dict) else body
        print(f"{printable(session)}: {printable(why)}", file=sys.stderr)
    return 1 if failed else 0


def _destinations(args: argparse.Namespace) -> int:
    """
    C{wingatemap destinations}: one line per destination of every list, with its host:port
    and up or down (since when, live and total sessions, the last error).
    """
    from .printable import printable

    try:
        status, body = _admin_request(args.config, "GET", "/destinations")
    except (ConfigError, WingateMapError) as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    found = body.get("destinations") if isinstance(body, dict) else None
    if status != 200 or not isinstance(found, list):
        print(f"admin API answered {status}: {printable(body)}", file=sys.stderr)
        return 1
    found = [d for d in found if args.mapping is None or d.get("mapping") == args.mapping]
    columns = ["destination", "state", "mapping", "rule", "since", "live", "total", "last_error"]
    rows = [[d["destination"], d["state"], d["mapping"], str(d["rule"]), d["since"], str(d["live"]), str(d["total"]), d["last_error"] or "-"] for d in found]
    _print_listing(found, args.json, columns, rows, "(no destinations)")
    return 0


def _reload(args: argparse.Namespace) -> int:
    from .printable import printable

    try:
        status, body = _admin_request(args.config, "POST", "/reload")
    except (ConfigError, WingateMapError) as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    if status == 200:
        print("reloaded")
        return 0
    problems = body.get("errors") if isinstance(body, dict) else None
    if isinstance(problems, list):
        print("reload refused, the running configuration stays:", file=sys.stderr)
        for problem in problems:
            print(printable(problem), file=sys.stderr)
    else:
        print(f"admin API answered {status}: {printable(body)}", file=sys.stderr)
    return 1


def _check(args: argparse.Namespace) -> int:
    from .tap import build_config

    try:
        config = build_config(args.config, args.map)
        lines = describe(config)
    except ConfigError as e:
        for problem in e.problems:
            print(str(problem), file=sys.stderr)
        return EXIT_INVALID
    except WingateMapError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    print("\n".join(lines))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .policy import AssumedIdentitySource, IdentityResolver
    from .config import client_address
    from .values import ClientInfo
    from .policy import MappingRuleService
    from .tap import build_config

    try:
        config = build_config(args.config, args.map, check_bindings=False)
    except ConfigError as e:
        for problem in e.problems:
            print(str(problem), file=sys.stderr)
        return EXIT_INVALID
    try:
        mapping = config.mapping(args.mapping)
    except KeyError:
        names = ", ".join(m.name for m in config.mappings) or "none"
        print(f"no mapping called {args.mapping!r} (mappings: {names})", file=sys.stderr)
        return EXIT_INVALID
    address = client_address(args.client_ip)
    if address is None:
        print(f"{args.client_ip!r} is not an IP address", file=sys.stderr)
        return EXIT_INVALID
    from .config import load_timezone, parse_moment

    tz = load_timezone(config.service.timezone)
    at = None
    if args.at is not None:
        try:
            at = parse_moment(args.at, tz)
        except ValueError as e:
            print(f"--at: {e}", file=sys.stderr)
            return EXIT_INVALID
    sni = args.sni.lower().rstrip(".") if args.sni else None
    service = MappingRuleService(mapping, IdentityResolver.of([AssumedIdentitySource(config.users)]), tz=tz)
    client = ClientInfo(mapping=mapping.name, client_ip=str(address), client_port=0, local_ip="", local_port=mapping.port, sni=sni)
    _, lines = service.explain(client, at=at)
    print(f"mapping {mapping.name} (port {mapping.port}){'' if mapping.enabled else ' [disabled]'}")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of the C{wingatemap} console script.
    """
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "explain":
        return _explain(args)
    if args.command == "intercept-rules":
        return _intercept_rules(args)
    if args.command == "sessions":
        return _sessions(args)
    if args.command == "kill":
        return _kill(args)
    if args.command == "reload":
        return _reload(args)
    if args.command == "destinations":
        return _destinations(args)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
