"""
Run wingatemap from a .tac file:  twistd -ny wingatemap.tac

The configuration file is $WINGATEMAP_CONFIG, or wingatemap.toml in the current directory.
"""

import os

from twisted.application.service import Application

from wingate_map import service_from_file

application = Application("wingatemap")
service_from_file(os.environ.get("WINGATEMAP_CONFIG", "wingatemap.toml")).setServiceParent(application)
