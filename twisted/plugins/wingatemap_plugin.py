"""
The C{twistd wingatemap} plugin.
"""

from twisted.application.service import ServiceMaker

wingatemap = ServiceMaker("wingatemap", "wingate_map.tap", "WinGate-style TCP mapping service", "wingatemap")
