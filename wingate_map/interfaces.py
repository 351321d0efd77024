"""
The replaceable parts of wingatemap, as zope interfaces.

The relay depends only on these: which user a client is (L{IIdentitySource}), where it goes
(L{IRuleService}), how to reach a destination (L{IDestinationEndpointFactory}) and who hears
about sessions (L{IEventSink}).  Later features (TLS client certificates, admin logins, handlers)
plug in as further implementations without touching the relay.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IIdentitySource(Interface):
    """
    Recognises the user behind a client connection.
    """

    level = Attribute(
        "The identity level this source proves: 'authenticated' or 'assumed'. Sources are asked "
        "from the strongest level down; the first that recognises the client wins."
    )

    def identify(client):
        """
        Who C{client} (a L{wingate_map.rules.ClientInfo}) is.

        @return: a L{wingate_map.identity.Identity}, or L{None} if this source does not know.
        """


class IRuleService(Interface):
    """
    Chooses, for one mapping, what happens to each accepted client.
    """

    def decide(client):
        """
        Decide for C{client} (a L{wingate_map.rules.ClientInfo}).

        @return: a L{wingate_map.rules.Decision}, or a L{Deferred} firing with one.
        """


class IDestinationEndpointFactory(Interface):
    """
    Builds the client endpoint that reaches a destination.
    """

    def endpoint_for_destination(destination, timeout, preamble=b""):
        """
        An L{IStreamClientEndpoint} for C{destination} (a L{wingate_map.config.Destination}),
        giving up a single attempt after C{timeout} seconds.  C{preamble} (a PROXY header) must
        be the first bytes on the wire, before any TLS handshake.  For a TLS destination the
        connected protocol's transport provides C{handshakeCompleted} notifications
        (L{IHandshakeListener}) and half-close.
        """


class IEventSink(Interface):
    """
    Hears about sessions: ClientConnect and ClientDisconnect, as dicts of the SPEC's fields.
    """

    def client_connect(event):
        """
        A client was accepted and its destination chosen; nothing is relayed yet.

        @return: L{None} or C{True} to allow, C{False} to block the session (reason
            C{blocked}), or a L{Deferred} firing with one of those.  An exception blocks too.
        """

    def client_disconnect(event):
        """
        A session is over.  The return value is ignored and never delays anything.
        """
