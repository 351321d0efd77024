"""
The configuration: the TOML file read into a frozen model (L{Config} of L{Mapping}s with their
L{Rule}s and L{Destination}s), every problem reported with its key path, and the grammar of the
values the model holds: client locations (C{from}, users' C{locations}), schedules (C{when}),
server-name patterns (C{sni}), rates (C{rate_limit}) and balancing methods.

The model knows nothing of the runtime: the policy (L{wingate_map.policy}) and the relay
(L{wingate_map.relay}) read it, never the other way round.

Private modules: C{_model} (the model and the file reader), C{_locations}, C{_schedule},
C{_names} (server names), C{_rates}, C{_balancing}.
"""

from ._balancing import FAILOVER, LEAST_CONNECTIONS, MAX_WEIGHT, METHODS, ROUND_ROBIN, SOURCE_HASH
from ._locations import Location, LocationIndex, LocationSet, RangeLists, client_address, parse_location
from ._model import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_MAX_RUNNING,
    Config,
    Destination,
    Handler,
    Mapping,
    Rule,
    ServiceSettings,
    User,
    format_host_port,
    load_config,
    parse_config,
    parse_map_option,
    with_mappings,
)
from ._names import check_sni_pattern, host_name, sni_matches
from ._rates import RATE_FORM, parse_rate
from ._schedule import Schedule, load_timezone, parse_moment, parse_window

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MAX_RUNNING",
    "FAILOVER",
    "LEAST_CONNECTIONS",
    "MAX_WEIGHT",
    "METHODS",
    "RATE_FORM",
    "ROUND_ROBIN",
    "SOURCE_HASH",
    "Config",
    "Destination",
    "Handler",
    "Location",
    "LocationIndex",
    "LocationSet",
    "Mapping",
    "RangeLists",
    "Rule",
    "Schedule",
    "ServiceSettings",
    "User",
    "check_sni_pattern",
    "client_address",
    "format_host_port",
    "host_name",
    "load_config",
    "load_timezone",
    "parse_config",
    "parse_location",
    "parse_map_option",
    "parse_moment",
    "parse_rate",
    "parse_window",
    "sni_matches",
    "with_mappings",
]
