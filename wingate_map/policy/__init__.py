"""
The policy: who a client is (identity sources: assumed from its location, authenticated by a
TLS client certificate or an admin-API login) and where it goes (a mapping's rules, in order).

It reads the configuration (L{wingate_map.config}) and speaks in the shared values of
L{wingate_map.values}; it never imports the relay.

Private modules: C{_identity}, C{_rules}, C{_credentials} (admin-API logins).
"""

from ._credentials import CredentialStore
from ._identity import AssumedIdentitySource, CertificateIdentitySource, IdentityResolver, identity_of
from ._rules import MappingRuleService

__all__ = [
    "AssumedIdentitySource",
    "CertificateIdentitySource",
    "CredentialStore",
    "IdentityResolver",
    "MappingRuleService",
    "identity_of",
]
