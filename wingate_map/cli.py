"""
The C{wingatemap} command: C{run} (the twistd form, for people who do not know twistd) and
C{check} (validate and print every listener and mapping).
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
    for sub in (run, check):
        sub.add_argument("--config", "-c", default=None, help=f"configuration file (default ./{DEFAULT_CONFIG_PATH})")
        sub.add_argument("--map", action="append", default=[], metavar="[ADDRESS:]PORT=HOST:PORT", help="a quick mapping (repeatable)")
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
    listeners = plan_listeners(config)
    for listener in listeners:
        lines.append(f"  {listener} -> {listener.mapping}")
    lines.append("mappings:")
    for mapping in config.mappings:
        if not mapping.enabled:
            lines.append(f"  {mapping.name}: disabled")
            continue
        lines.append(f"  {mapping.name}: port {mapping.port}, bind {', '.join(mapping.bind)}, connect_timeout {mapping.connect_timeout:g}s, idle_timeout {mapping.idle_timeout:g}s")
        if mapping.default:
            lines.append(f"    default -> {' | '.join(str(d) for d in mapping.default)}")
        else:
            lines.append("    default -> (none: unmatched clients are refused)")
    return lines


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


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of the C{wingatemap} console script.
    """
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
