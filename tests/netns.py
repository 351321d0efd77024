"""
Test hosts in network namespaces: each test creates its own namespaces and veth pairs, with
addresses that exist only inside them, and removes them afterwards.  Traffic never leaves them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespaces_available() -> str | None:
    """
    Why namespace tests cannot run here, or L{None} if they can.
    """
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"wgm-probe-{secrets.token_hex(3)}"
    result = ip("netns", "add", name, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    ip("netns", "del", name, check=False)
    return None


def require_namespaces() -> None:
    """
    Skip (saying why) where namespaces cannot be created; under CI that is a failure.
    """
    why = namespaces_available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"namespace tests must run in CI: {why}")
        pytest.skip(why)


class Lab:
    """
    A set of namespaces joined by veth pairs.
    """

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.links = 0

    def namespace(self, role: str) -> str:
        name = f"wgm-{role}-{self.tag}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        self.run(name, "ip", "link", "set", "lo", "up")
        return name

    def link(self, a: str, a_address: str, b: str, b_address: str) -> tuple[str, str]:
        """
        A veth pair between namespaces C{a} and C{b} with the given CIDR addresses; returns the
        two interface names.
        """
        self.links += 1
        a_if, b_if = f"v{self.tag}a{self.links}", f"v{self.tag}b{self.links}"
        ip("link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
        for ns, name, address in ((a, a_if, a_address), (b, b_if, b_address)):
            self.run(ns, "ip", "addr", "add", address, "dev", name, "nodad" if ":" in address else "")
            self.run(ns, "ip", "link", "set", name, "up")
        return a_if, b_if

    def run(self, namespace: str, *argv: str) -> subprocess.CompletedProcess:
        args = [a for a in argv if a]
        return subprocess.run(["ip", "netns", "exec", namespace, *args], capture_output=True, text=True, check=True)

    def prefix(self, namespace: str) -> list[str]:
        """
        The argv prefix that runs a command inside C{namespace}.
        """
        return ["ip", "netns", "exec", namespace]

    def close(self) -> None:
        for name in reversed(self.namespaces):
            ip("netns", "del", name, check=False)
        self.namespaces = []


@pytest.fixture
def lab():
    require_namespaces()
    created = Lab()
    try:
        yield created
    finally:
        created.close()
