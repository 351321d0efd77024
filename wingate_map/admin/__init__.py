"""
The admin API: a twisted.web site (sessions, kill, activity, destinations, metrics, health,
reload, logins) and the activity page, on a UNIX socket or a loopback/TLS address.

Private modules: C{_api} (the site and its resources), C{_activity} (the activity queries and
page).
"""

from ._activity import session_json
from ._api import _is_loopback as is_loopback
from ._api import listen_admin

__all__ = ["is_loopback", "listen_admin", "session_json"]
