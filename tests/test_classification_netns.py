"""
Adapter usage classes on a real kernel: a gateway in its own network namespace, with adapters
carrying private, documentation-range ("public") and automatic IPv6 link-local addresses, run
with the default C{bind = "internal"}.  Every address exists only inside the namespaces the test
creates; anything public-looking is from the documentation ranges.
"""

from __future__ import annotations

import subprocess
import sys

from .netns import lab  # noqa: F401  (fixture)
from .test_end_to_end import ENV, TWISTD, Proc
from .test_namespaces import SERVER, fetch


def listening(lab, namespace: str, port: int) -> set[str]:
    """
    The local addresses with a TCP socket listening on C{port} in C{namespace}, as ss prints them.
    """
    out = lab.run(namespace, "ss", "-ltnH").stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.split()[3].endswith(f":{port}")}


def test_default_bind_listens_on_internal_adapters_only(lab, tmp_path):
    """
    With the default bind, a gateway listens on its loopback and private adapter only: not on an
    adapter with a public address (plus its IPv6 link-local one, and even a private one beside
    it), not on a shared-range (100.64/10) adapter, not on any IPv6 link-local address.  A
    client on the public side is refused, one on the private side is served; a public address
    that appears later gets no listener while a private one does.
    """
    gw = lab.namespace("gw")
    client = lab.namespace("cl")
    public_if, client_public_if = lab.link(gw, "192.0.2.1/24", client, "192.0.2.2/24")
    private_if, client_private_if = lab.link(gw, "10.99.0.1/24", client, "10.99.0.2/24")
    shared_if, _ = lab.link(gw, "100.64.0.1/24", client, "100.64.0.2/24")
    extra = (
        (gw, public_if, "2001:db8::1/64"),
        (client, client_public_if, "2001:db8::2/64"),
        (gw, public_if, "10.98.0.1/24"),  # a private address beside a public one: still external
        (client, client_public_if, "10.98.0.2/24"),
        (gw, private_if, "fd99::1/64"),
        (client, client_private_if, "fd99::2/64"),
    )
    for namespace, name, address in extra:
        lab.run(namespace, "ip", "addr", "add", address, "dev", name, "nodad" if ":" in address else "")
    # The kernel gives each veth an fe80:: address once its link is up, asynchronously; a fixed
    # one makes sure every adapter has one when wingatemap first looks.
    for number, name in enumerate((public_if, private_if, shared_if), 1):
        lab.run(gw, "ip", "addr", "add", f"fe80::99:{number}/64", "dev", name, "nodad")
    server = subprocess.Popen(lab.prefix(gw) + [sys.executable, "-c", SERVER, "7001", "served"], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    config = tmp_path / "wingatemap.toml"
    config.write_text('[service]\nadapter_poll_interval = 0.2\n[mappings.m]\nport = 7000\ndefault = { host = "127.0.0.1", port = 7001 }\n')
    proc = Proc(lab.prefix(gw) + TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path), env=ENV)
    try:
        line = proc.wait_line(r"mapping m: listening on ")
        assert "mapping m: listening on 127.0.0.1:7000, [::1]:7000, 10.99.0.1:7000, [fd99::1]:7000;" in line, proc.output()
        assert listening(lab, gw, 7000) == {"127.0.0.1", "[::1]", "10.99.0.1", "[fd99::1]"}
        assert fetch(lab, client, "10.99.0.1", 7000) == "served"
        assert fetch(lab, client, "fd99::1", 7000) == "served"
        for address in ("192.0.2.1", "2001:db8::1", "10.98.0.1", "100.64.0.1"):
            assert "Connection refused" in fetch(lab, client, address, 7000), address
        # Added in this order, the watcher's poll that sees the private address has seen the
        # public one too.
        lab.run(gw, "ip", "addr", "add", "203.0.113.1/24", "dev", public_if)
        lab.run(gw, "ip", "addr", "add", "10.99.0.9/24", "dev", private_if)
        proc.wait_line(r"mapping m: new address 10\.99\.0\.9; listening on 10\.99\.0\.9:7000", timeout=30)
        assert "203.0.113.1" not in proc.output()
        assert listening(lab, gw, 7000) == {"127.0.0.1", "[::1]", "10.99.0.1", "[fd99::1]", "10.99.0.9"}
    finally:
        code = proc.stop()
        server.kill()
        server.wait()
    assert code in (0, -15), proc.output()
