"""
wingatemap: a WinGate-style TCP mapping service built on Twisted.

Embedding API::

    from wingate_map import service_from_file
    service = service_from_file("wingatemap.toml")
    service.subscribe(my_sink)          # an IEventSink; may veto ClientConnect
    service.setServiceParent(application)

Build from a file (L{service_from_file}), a string (L{service_from_string}) or objects
(L{WingateMapService} with a L{Config} of L{Mapping} and L{Destination}).

Started by twistd (a C{.tac}), the service is the whole program: SIGHUP reloads, a second
SIGTERM ends the drain, systemd is notified.  Started by your own code (C{startService()}) it
changes nothing process-wide unless built with C{standalone=True}.
"""

from __future__ import annotations

from typing import Any

from .config import Config, Destination, Mapping, ServiceSettings, load_config, parse_config
from .errors import BindError, BindingError, ConfigError, WingateMapError
from .interfaces import IDestinationEndpointFactory, IEventSink, IIdentitySource, IRuleService
from .service import WingateMapService

__all__ = [
    "Config",
    "Destination",
    "Mapping",
    "ServiceSettings",
    "load_config",
    "parse_config",
    "service_from_file",
    "service_from_string",
    "WingateMapService",
    "WingateMapError",
    "ConfigError",
    "BindError",
    "BindingError",
    "IEventSink",
    "IRuleService",
    "IIdentitySource",
    "IDestinationEndpointFactory",
]


def service_from_file(path: str, **kwargs: Any) -> WingateMapService:
    """
    A L{WingateMapService} for the configuration file at C{path} (which C{reload()} re-reads,
    also on SIGHUP when the service is standalone, as under twistd); keyword arguments go to
    L{WingateMapService} (C{reactor}, C{sinks}, C{endpoints}, C{standalone}...).

    @raise ConfigError: the file is unreadable or invalid (every problem listed).
    """
    kwargs.setdefault("config_path", path)
    return WingateMapService(load_config(path), **kwargs)


def service_from_string(text: str, base_dir: str | None = None, **kwargs: Any) -> WingateMapService:
    """
    A L{WingateMapService} for configuration C{text} (TOML).
    """
    return WingateMapService(parse_config(text, base_dir=base_dir), **kwargs)
