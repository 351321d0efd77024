"""
The exceptions wingatemap raises.

Every error an operator can cause carries enough to fix it: configuration errors name the key path,
the bad value and what is allowed; bind errors name the mapping, the address and the port.
"""

from __future__ import annotations

from attrs import frozen


class WingateMapError(Exception):
    """
    Base class of every error wingatemap raises on purpose.
    """


@frozen
class ConfigProblem:
    """
    One thing wrong with a configuration.

    @ivar path: the dotted key path, such as C{mappings.rdp.port} (empty for the file itself).
    @ivar message: what is wrong and what is allowed.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(WingateMapError):
    """
    A configuration is invalid; C{problems} lists every problem found, not just the first.
    """

    def __init__(self, problems: list[ConfigProblem] | tuple[ConfigProblem, ...]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class BindError(WingateMapError):
    """
    A listener could not be opened.
    """

    def __init__(self, mapping: str, address: str, port: int, why: str) -> None:
        self.mapping = mapping
        self.address = address
        self.port = port
        self.why = why
        host = f"[{address}]" if ":" in address else address
        super().__init__(f"mapping {mapping}: cannot listen on {host}:{port}: {why}")


class BindingError(WingateMapError):
    """
    The listeners a configuration asks for cannot be worked out on this machine (a C{bind} that
    matches no address, or two mappings claiming the same address and port).
    """
