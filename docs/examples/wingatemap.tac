"""
Run wingatemap from a .tac file:  twistd -ny wingatemap.tac

The configuration file is $WINGATEMAP_CONFIG, or wingatemap.toml in the current directory.
Started by twistd, the service is the whole program, as under the plugin: SIGHUP re-reads the
file, a second SIGTERM ends the drain, systemd is notified (NOTIFY_SOCKET), and a port that is
taken ends the start with one line naming it.
"""

import os

from twisted.application.service import Application

from wingate_map import service_from_file

application = Application("wingatemap")
service_from_file(os.environ.get("WINGATEMAP_CONFIG", "wingatemap.toml")).setServiceParent(application)
