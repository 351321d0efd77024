"""
The C{wingatemap} command: C{run} (the twistd form, for people who do not know twistd),
C{check} (validate and print every listener, mapping and rule) and C{explain} (who a client is
and where it would go).
"""

from __future__ import annotations

import argparse
import sys

from .bindings import plan_listeners
from .config import DEFAULT_CONFIG_PATH, Config
from .errors import ConfigError, WingateMapError

EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wingatemap", description="WinGate-style TCP mapping service")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run every enabled mapping (same as twistd -n wingatemap run)")
    check = commands.add_parser("check", help="validate the configuration and print listeners and mappings")
    explain = commands.add_parser("explain", help="show who CLIENT_IP is, which rule matches and why, and its destination")
    rules = commands.add_parser("intercept-rules", help="print the nftables ruleset transparent interception needs")
    for sub in (run, check, explain, rules):
        sub.add_argument("--config", "-c", default=None, help=f"configuration file (default ./{DEFAULT_CONFIG_PATH})")
        sub.add_argument("--map", action="append", default=[], metavar="[ADDRESS:]PORT=HOST:PORT", help="a quick mapping (repeatable)")
    explain.add_argument("mapping", metavar="MAPPING", help="the mapping's name")
    explain.add_argument("client_ip", metavar="CLIENT_IP", help="the client's IP address")
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
    for warning in list(config.warnings) + binding_warnings:
        lines.append(f"warning: {warning}")
    return lines


def _ports_text(ports: tuple[int, ...]) -> str:
    from .interception import _port_set

    return _port_set(ports).strip("{} ")


def _intercept_rules(args: argparse.Namespace) -> int:
    from .bindings import plan_listeners
    from .interception import Redirect, ruleset
    from .tap import build_config

    try:
        config = build_config(args.config, args.map, check_bindings=False)
        listeners = plan_listeners(config, warnings=[])
    except WingateMapError as e:
        print(str(e), file=sys.stderr)
        return EXIT_INVALID
    import ipaddress

    chosen: dict[tuple[str, str, int], Redirect] = {}
    for listener in listeners:
        mapping = config.mapping(listener.mapping)
        if mapping.intercept_transparent and listener.intercept and listener.adapter and not ipaddress.ip_address(listener.address).is_loopback:
            chosen.setdefault((mapping.name, listener.adapter, ipaddress.ip_address(listener.address).version), Redirect(mapping.name, listener.adapter, listener.address, mapping.intercept))
    if not any(m.intercept_transparent for m in config.enabled_mappings()):
        print("# no enabled mapping has intercept_transparent = true: no rules needed", file=sys.stderr)
    print(f"# nftables ruleset for transparent interception ({config.source}), for this machine's adapters now.")
    print("# Apply with: nft -f FILE   (wingatemap installs and removes it itself when it runs as root)")
    print(ruleset(chosen.values()), end="")
    return 0


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
    from .identity import AssumedIdentitySource, IdentityResolver
    from .locations import client_address
    from .rules import ClientInfo, MappingRuleService
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
    service = MappingRuleService(mapping, IdentityResolver.of([AssumedIdentitySource(config.users)]))
    client = ClientInfo(mapping=mapping.name, client_ip=str(address), client_port=0, local_ip="", local_port=mapping.port)
    _, lines = service.explain(client)
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
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
