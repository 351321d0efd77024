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
        Who C{client} (a L{wingate_map.values.ClientInfo}) is.

        @return: a L{wingate_map.values.Identity}, or L{None} if this source does not know.
        """


class IRuleService(Interface):
    """
    Chooses, for one mapping, what happens to each accepted client.
    """

    def decide(client):
        """
        Decide for C{client} (a L{wingate_map.values.ClientInfo}).

        @return: a L{wingate_map.values.Decision}, or a L{Deferred} firing with one.
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


class IClusterStore(Interface):
    """
    The state several gateways share (SPEC §7): node registration, logins, cluster-wide
    per-client counts, the session directory, kill routing and the events stream.

    Nothing here may hold up the relay: reads the relay needs (L{login}) answer from a local
    cache, L{add_event} only queues, and the one round trip on a connection's path is
    L{acquire}, made only for mappings with C{limits_scope = "cluster"}.  While the link is down
    (L{state} C{"down"}) calls that need the store fail at once with
    L{wingate_map.cluster.ClusterUnavailable}, so the caller falls back to node-local limits.
    """

    node = Attribute("This gateway's node name (C{cluster.node}).")
    state = Attribute("C{'up'} while the link to the shared store works, else C{'down'} (/healthz degraded).")
    dropped = Attribute("How many events were dropped because the stream could not keep up.")

    def start():
        """
        Connect and register this node.

        @return: a Deferred firing once the node is registered and the link is up; it fails with
            L{wingate_map.cluster.NodeNameTaken} if another live gateway holds the node name
            (the store then stops), or with L{wingate_map.cluster.ClusterUnavailable} if the
            link is not up within the connect timeout (the store keeps trying in the
            background and registers once it can).
        """

    def stop(deregister=True):
        """
        Stop heartbeating and disconnect.  With C{deregister} (a clean shutdown) the node's
        registration, sessions and counts are removed at once and waiting events are written
        (within a bound); without it they expire after C{node_ttl}, as for a crashed gateway.

        @return: a Deferred firing when done.
        """

    def add_state_observer(observer):
        """
        Call C{observer(state)} whenever L{state} changes.
        """

    def when_state(state):
        """
        A Deferred firing once L{state} is C{state}.
        """

    def put_login(client_ip, user, ttl):
        """
        C{client_ip} (canonical form) is C{user} for C{ttl} seconds on every gateway.

        @return: a Deferred firing once written and announced.
        """

    def delete_login(client_ip):
        """
        Forget C{client_ip}'s login on every gateway.

        @return: a Deferred firing once deleted and announced.
        """

    def login(client_ip):
        """
        This gateway's cached login of C{client_ip}: C{(user, expiry)} with the expiry on the
        local clock, or L{None}.  No round trip.
        """

    def logins():
        """
        Every cached unexpired login: client address -> C{(user, expiry)}.  No round trip.
        """

    def acquire(mapping, client_ip, limit, session_id):
        """
        Atomically count C{session_id} as one of C{client_ip}'s sessions on C{mapping} across
        the cluster if fewer than C{limit} are live (sessions of gateways whose registration
        expired do not count).  Call L{release} for every session this was called for.

        @return: a Deferred firing with C{True} (counted) or C{False} (at the limit); it fails
            with L{wingate_map.cluster.ClusterUnavailable} while the link is down.
        """

    def hold(mapping, client_ip, session_id):
        """
        Count C{session_id} without checking (a session admitted on node-local limits while the
        link was down); it is written when the link is back.
        """

    def release(session_id):
        """
        C{session_id} no longer counts (sent later if the link is down).  Never fails.
        """

    def publish_sessions(sessions):
        """
        Write this node's live sessions (dicts of the /sessions fields) to the session directory,
        in one batch.  Also done on every heartbeat with the C{sessions} source given to the
        store.

        @return: a Deferred firing once written.
        """

    def cluster_sessions():
        """
        The sessions of every live gateway, each dict with C{node} set.

        @return: a Deferred firing with a list.
        """

    def kill(session_id):
        """
        End C{session_id} wherever it runs: this node's kill handler is asked first, then the
        other gateways through the store.

        @return: a Deferred firing with C{True} once the owner confirmed, C{False} if no live
            gateway has the session; it fails with L{wingate_map.cluster.KillTimeout} when no
            confirmation came within the bound.
        """

    def add_event(event):
        """
        Append C{event} to the events stream (when one is configured).  Never blocks: events
        are buffered up to a bound and written in pipelined batches; beyond the bound they are
        dropped and counted in L{dropped}.
        """

    def recent_events(count):
        """
        The last C{count} events of the stream, oldest first.

        @return: a Deferred firing with a list of dicts.
        """

    def events_length():
        """
        How many entries the events stream holds.

        @return: a Deferred firing with an int.
        """
