"""
twistd integration: C{twistd -n wingatemap run --config FILE} or C{--map [ADDRESS:]PORT=HOST:PORT}.

L{makeService} only composes; the same builder serves twistd, C{.tac} files and embedding.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.python import usage

from .network import plan_listeners
from .config import DEFAULT_CONFIG_PATH, Config, load_config, parse_map_option, with_mappings
from .errors import WingateMapError
from .service import WingateMapService


class RunOptions(usage.Options):
    """
    Options of C{wingatemap run}.
    """

    synopsis = "[--config FILE] [--map [ADDRESS:]PORT=HOST:PORT ...]"
    longdesc = (
        "Run every enabled mapping of the configuration file (default ./wingatemap.toml). "
        "--map adds a quick mapping; with --map and no --config, no file is read."
    )
    optParameters = [["config", "c", None, f"configuration file (default: ./{DEFAULT_CONFIG_PATH})"]]

    def __init__(self) -> None:
        super().__init__()
        self["maps"] = []
        self.loaded: Config | None = None
        self.config_path: str | None = None
        self.extra_mappings: tuple[Any, ...] = ()

    def opt_map(self, value: str) -> None:
        """
        A quick mapping [ADDRESS:]PORT=HOST:PORT (repeatable), e.g. 8080=db.internal:5432.
        """
        self["maps"].append(value)

    def postOptions(self) -> None:
        from .config import parse_map_option

        if self["config"] is not None or not self["maps"]:
            self.config_path = os.path.abspath(self["config"] or DEFAULT_CONFIG_PATH)
        try:
            self.extra_mappings = tuple(parse_map_option(m) for m in self["maps"])
            self.loaded = build_config(self["config"], self["maps"])
        except WingateMapError as e:
            # Not a usage mistake: print each problem (key path first), not the option summary.
            sys.stderr.write(f"wingatemap: invalid configuration:\n{e}\n")
            raise SystemExit(2) from None


def build_config(path: str | None, maps: list[str], check_bindings: bool = True) -> Config:
    """
    The configuration from C{path} (default ./wingatemap.toml, unless only C{maps} are given)
    plus the C{--map} mappings, checked against this machine's adapters.

    @raise WingateMapError: anything wrong, every problem listed.
    """
    from .errors import ConfigError

    config = Config(source="--map")
    if path is not None or not maps:
        config = load_config(path or DEFAULT_CONFIG_PATH)
    extra = []
    problems = []
    for text in maps:
        try:
            extra.append(parse_map_option(text))
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    config = with_mappings(config, extra)
    if check_bindings:
        plan_listeners(config)
    return config


class Options(usage.Options):
    """
    C{twistd wingatemap} options: a subcommand is required.
    """

    synopsis = "run [--config FILE] [--map [ADDRESS:]PORT=HOST:PORT ...]"
    subCommands = [["run", None, RunOptions, "Run every enabled mapping"]]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a subcommand is required: run")


class ProgramService(WingateMapService):
    """
    The service as twistd's whole program: added to twistd's application, it also becomes its
    log observer (C{[service] log_level} and C{log_format}, journald-friendly under systemd;
    see L{wingate_map.logs}), written where twistd's own would be (C{--logfile}, rotation,
    standard output).  twistd's C{--logger} and C{--syslog} still take precedence.

    @ivar twistd_options: twistd's own options (C{--logfile}, C{--nodaemon}, ...), or L{None}.
    """

    twistd_options: Any = None

    def setServiceParent(self, parent: Any) -> None:
        """
        Join C{parent}; when it is twistd's application, log through L{ServiceLogObserver}.
        """
        if self.twistd_options is not None:
            from .events import install

            install(parent, self, self.twistd_options)
        super().setServiceParent(parent)


def makeService(options: Options, reactor: Any = None) -> Any:
    """
    The service for C{twistd wingatemap run}: the whole program (SIGHUP reloads, systemd is
    told, the log follows C{[service] log_level} / C{log_format}, a start failure is one
    line; see L{WingateMapService}'s C{standalone} and L{ProgramService}).
    """
    run = options.subOptions
    assert run is not None and run.loaded is not None
    service = ProgramService(
        run.loaded,
        reactor=reactor,
        config_path=run.config_path,
        extra_mappings=run.extra_mappings,
        standalone=True,
    )
    service.spawn_workers = True
    twistd = getattr(options, "parent", None)  # twistd's own options, with --uid / --gid
    service.twistd_options = twistd
    if twistd is not None and (twistd.get("uid") is not None or twistd.get("gid") is not None):
        service.run_as = (twistd.get("uid"), twistd.get("gid"))
    return service
