"""
Embedding wingatemap in another Twisted application.

Builds the service from a configuration string, subscribes an event sink that blocks one client
address and prints every event, and runs it on the reactor:

    python3 embed.py LISTEN_PORT DEST_PORT BLOCKED_IP

Clients from BLOCKED_IP are accepted and then closed (ClientDisconnect reason "blocked");
everyone else reaches 127.0.0.1:DEST_PORT.
"""

import json
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from zope.interface import implementer

from wingate_map import IEventSink, service_from_string


@implementer(IEventSink)
class Doorman:
    """
    Blocks one client address; prints every event as JSON.
    """

    def __init__(self, blocked_ip):
        self.blocked_ip = blocked_ip

    def client_connect(self, event):
        print(json.dumps(event), flush=True)
        return event["client_ip"] != self.blocked_ip  # False vetoes the session

    def client_disconnect(self, event):
        print(json.dumps(event), flush=True)


def main(listen_port, dest_port, blocked_ip):
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    service = service_from_string(
        f"""
        [mappings.app]
        port = {listen_port}
        bind = "127.0.0.1"
        default = {{ host = "127.0.0.1", port = {dest_port} }}
        """,
        reactor=reactor,
    )
    service.subscribe(Doorman(blocked_ip))
    # Started by our own code, the service leaves this process's signal handling alone
    # (standalone=True would give it SIGHUP, a second SIGTERM and systemd notification, as under twistd).
    service.startService()  # raises BindError if a listener cannot bind
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
