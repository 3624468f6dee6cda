"""The cluster bootstrap machine: one declared table.

Theory of operation
-------------------
Rule 1: everything that decides *which state comes next* lives in this file, in the
table below. Activities (:mod:`clusterfsm.states.activities`) only do the work of a state and
return a trigger or raise a typed error; the table says where that leads. The runner
(:mod:`clusterfsm.fsm.runner`) compiles the table to a ``transitions.Machine`` and refuses any
move the table does not allow, so the diagram (``diagrams/bootstrap.mmd``, drawn from
this table) is exactly what can happen.

Every rank runs this same machine::

    idle [-> waiting_for_link] -> discovering -> handshaking -> awaiting_session
         -> exchanging_bootstrap -> initializing_group -> confirming_group -> ready
         -> closed

(``waiting_for_link`` only with ``--interface``: it waits for the cables, unbounded
unless given a deadline, see :mod:`clusterfsm.states.linkstates`; a cable pulled while
discovering or in ``ready`` ends the run in ``link_lost`` naming the interface.)

Rank 0 is the coordinator (it listens, creates the session, decides the topology and
releases the barrier); the others join it. Every state but ``ready`` has a deadline,
declared below as its default (``--deadline STATE=SECONDS`` overrides it for a run; the
runner checks and merges overrides, see :func:`clusterfsm.fsm.effective_deadlines`),
whose expiry has its own error type and error state; ``ready`` lasts until the app
closes the cluster (``closed``), a peer closes its end on purpose (``peer_left``, a
clean end: its GOODBYE came before its link closed) or a peer is lost (``peer_lost``,
an error: its link closed without a GOODBYE, or its heartbeats stopped). Ranks whose
apps close together all end in ``closed``: each says GOODBYE and waits briefly for its
peers' before closing its links. Every failure is a named error state carrying a
frozen attrs error value; nothing ends in a silent size-1 group.
"""

from __future__ import annotations

from clusterfsm.fsm import ErrorState, MachineSpec, State, Transition, machine_spec
from clusterfsm.states import activities as act
from clusterfsm.states import linkstates
from clusterfsm.states.errors import (
    BackendUnavailable,
    BootstrapRejected,
    BootstrapTimeout,
    ConfirmationTimeout,
    DiscoveryTimeout,
    DuplicateNodeId,
    ElectionFailed,
    FrameError,
    GroupAlreadyInitialized,
    GroupInitFailed,
    GroupInitTimeout,
    GroupSizeMismatch,
    HandshakeRejected,
    HandshakeTimeout,
    IncompatiblePeer,
    InterfaceUnavailable,
    LinkLost,
    LinkTampered,
    LinkWaitTimeout,
    PeerAborted,
    PeerDisconnected,
    PeerLost,
    PrecheckFailed,
    SessionUnavailable,
    bind_error_states,
)
from clusterfsm.states.transport import BindFailed

LINK_ERRORS = (FrameError, PeerDisconnected, PeerAborted, LinkTampered)

BOOTSTRAP: MachineSpec = machine_spec(
    "bootstrap",
    initial="idle",
    doc="Brings N ranks from nothing to one ready MLX distributed group.",
    states=[
        State("idle", act.idle, deadline=5.0, on_timeout=DiscoveryTimeout,
              raises=(BindFailed,),
              doc="Start the init watchdog; rank 0 of a static cluster opens its "
                  "control listener."),
        State("waiting_for_link", linkstates.waiting_for_link, steady=True,
              on_timeout=LinkWaitTimeout, raises=(BindFailed, InterfaceUnavailable),
              doc="Wait, woken by the kernel, until every --interface is up, has "
                  "carrier and an address (a cable not in yet is not a failure; no "
                  "deadline unless --deadline waiting_for_link=S); then listen on each."),
        State("discovering", act.discovering, deadline=10.0,
              on_timeout=DiscoveryTimeout,
              raises=(InterfaceUnavailable, LinkLost, DuplicateNodeId, ElectionFailed),
              doc="Find the peers: a static list, or beacons on each --interface, "
                  "then the rank election."),
        State("handshaking", act.handshaking, deadline=15.0,
              on_timeout=HandshakeTimeout,
              raises=(HandshakeRejected, InterfaceUnavailable, *LINK_ERRORS),
              doc="Noise_NNpsk0 handshake with every rank (mutual, pre-shared key, "
                  "ephemeral X25519); rank 0 creates the session id; the link is "
                  "sealed from then on."),
        State("awaiting_session", act.awaiting_session, deadline=5.0,
              on_timeout=SessionUnavailable, raises=LINK_ERRORS,
              doc="Wait, on events, until every link answered a heartbeat."),
        State("exchanging_bootstrap", act.exchanging_bootstrap,
              deadline=5.0, on_timeout=BootstrapTimeout,
              raises=(BootstrapRejected, BackendUnavailable, IncompatiblePeer,
                      PrecheckFailed, *LINK_ERRORS),
              doc="Rank 0 checks every rank's compatibility and the backend, sends "
                  "the 0x07 bootstrap frame; every rank acknowledges."),
        State("initializing_group", act.initializing_group,
              deadline=40.0, on_timeout=GroupInitTimeout,
              raises=(BackendUnavailable, PrecheckFailed, GroupAlreadyInitialized,
                      GroupInitFailed, GroupSizeMismatch, BootstrapRejected, *LINK_ERRORS),
              doc="Barrier, staggered release, mx.distributed.init under a hard deadline."),
        State("confirming_group", act.confirming_group, deadline=10.0,
              on_timeout=ConfirmationTimeout, raises=(BootstrapRejected, *LINK_ERRORS),
              doc="Every rank reports its group to rank 0, which confirms to all."),
        State("ready", act.ready, steady=True, raises=(PeerLost, LinkLost, LinkTampered),
              doc="The group is the app's; heartbeats watch the peers, the kernel "
                  "watches the cables."),
        State("closed", doc="The app closed the cluster (GOODBYE to every peer)."),
        State("peer_left", doc="A peer's app closed the cluster on purpose (GOODBYE, "
                               "then its link closed) while this rank was in ready: a "
                               "clean end, not an error; the group is no longer whole."),
    ],
    transitions=[
        Transition("idle", "start", "discovering"),
        Transition("idle", "await_link", "waiting_for_link"),
        Transition("waiting_for_link", "link_up", "discovering"),
        Transition("discovering", "peers_found", "handshaking"),
        Transition("handshaking", "authenticated", "awaiting_session"),
        Transition("awaiting_session", "session_ready", "exchanging_bootstrap"),
        Transition("exchanging_bootstrap", "bootstrap_agreed", "initializing_group"),
        Transition("initializing_group", "group_initialized", "confirming_group"),
        Transition("confirming_group", "group_confirmed", "ready"),
        Transition("ready", "close", "closed"),
        Transition("ready", "peer_left", "peer_left"),
    ],
    errors=[
        ErrorState("listen_failed", BindFailed,
                   doc="Rank 0 could not open its control port (in use, bad address).",
                   remedy="Pick a free --listen port or stop the process holding it."),
        ErrorState("interface_unavailable", InterfaceUnavailable,
                   doc="An --interface does not exist, or sockets cannot be bound to "
                       "it (a cable that is out is waited for, not this).",
                   remedy="Check the name (`clusterfsm doctor --interface IF`); see "
                          "docs/thunderbolt.md."),
        ErrorState("link_wait_timeout", LinkWaitTimeout,
                   doc="An --interface was still down, without carrier or address when "
                       "the deadline set with --deadline waiting_for_link=S passed.",
                   remedy="Plug the cable in; `clusterfsm doctor --interface IF` says "
                          "what is missing."),
        ErrorState("link_lost", LinkLost,
                   doc="An --interface went down, lost carrier (cable pulled) or its "
                       "address while discovering or in ready; the detail names it.",
                   remedy="Replug the cable; a supervised rank (--supervise) waits for "
                          "it and rebuilds the group."),
        ErrorState("discovery_timeout", DiscoveryTimeout,
                   doc="Not every peer was found in time; the detail lists who was heard "
                       "and which beacons were ignored (other key, version, world size).",
                   remedy="Check that the peers run and the addresses/interfaces are right."),
        ErrorState("duplicate_node_id", DuplicateNodeId,
                   doc="Two running nodes share a node id (a copied config).",
                   remedy="Delete the node-id file on one of them and restart it."),
        ErrorState("election_failed", ElectionFailed,
                   doc="No single rank assignment follows from the nodes heard: two "
                       "claim one rank, auto and explicit ranks are mixed, or too many "
                       "nodes answered.",
                   remedy="Use --rank auto on every node (or distinct explicit ranks) and "
                          "the same --world-size."),
        ErrorState("handshake_rejected", HandshakeRejected,
                   doc="A handshake was refused: wrong key, version, world size or "
                       "duplicate rank/node id (the reason says which, and who refused).",
                   remedy="Give every rank the same key file, version and --world-size, "
                          "and distinct ranks."),
        ErrorState("handshake_timeout", HandshakeTimeout,
                   doc="Not every rank completed the handshake in time; the detail lists "
                       "who is missing and which connections were refused.",
                   remedy="Start the missing ranks; check keys and firewalls."),
        ErrorState("protocol_error", FrameError,
                   doc="A peer sent bytes that are not a valid frame, or a message that "
                       "is not allowed at that point.",
                   remedy="Check that the peer is a clusterfsm rank of the same version."),
        ErrorState("link_tampered", LinkTampered,
                   doc="A frame on a sealed link did not authenticate: altered, replayed, "
                       "reordered, dropped, truncated, or injected in cleartext (a forged "
                       "ABORT, GOODBYE or bootstrap frame). The link was closed at once.",
                   remedy="Someone on the path between the ranks writes into the control "
                          "link (or a middlebox corrupts TCP); check the network."),
        ErrorState("peer_disconnected", PeerDisconnected,
                   doc="A peer's control link closed before the group was ready.",
                   remedy="Look at that rank's log; restart the cluster."),
        ErrorState("peer_aborted", PeerAborted,
                   doc="A peer failed and said so (ABORT frame or failed confirmation).",
                   remedy="The error named is the peer's; fix that rank."),
        ErrorState("session_unavailable", SessionUnavailable,
                   doc="No heartbeat answer from every peer before the deadline.",
                   remedy="Check the network between the ranks."),
        ErrorState("bootstrap_rejected", BootstrapRejected,
                   doc="The bootstrap frame, its ack, the go signal or the confirmation "
                       "belonged to another session or did not fit this rank.",
                   remedy="A stale rank from an earlier session is around; restart it."),
        ErrorState("bootstrap_timeout", BootstrapTimeout,
                   doc="The bootstrap frame or an acknowledgement did not arrive in time.",
                   remedy="Check the peer named in the detail."),
        ErrorState("backend_unavailable", BackendUnavailable,
                   doc="MLX cannot run the chosen backend here (e.g. jaccl on Linux or "
                       "without RDMA); checked before init.",
                   remedy="Use --backend ring, or enable RDMA (see docs/thunderbolt.md)."),
        ErrorState("incompatible_peers", IncompatiblePeer,
                   doc="Before init, rank 0 found a rank that does not fit: another MLX "
                       "or wire version, another world size, a backend it lacks, or an "
                       "app-defined field (model id, shard plan) that differs; the "
                       "detail names each difference.",
                   remedy="Install the same mlx and clusterfsm everywhere; give every "
                          "rank the same app fields."),
        ErrorState("precheck_failed", PrecheckFailed,
                   doc="A check before mx.distributed.init failed (RDMA disabled, RDMA "
                       "device missing or down, device matrix incomplete or malformed, "
                       "the route to a peer leaving through another interface than its "
                       "cable, the init attempts since boot at the device's max_pd, "
                       "no all_gather_factory in this mlx, no IPv4 ring address for a "
                       "rank); MLX was never called.",
                   remedy="The detail names the check and the command to run; see "
                          "docs/thunderbolt.md."),
        ErrorState("group_already_initialized", GroupAlreadyInitialized,
                   doc="This process already initialized an MLX group (MLX keeps one per "
                       "process and would hand back the old, possibly dead, one); found "
                       "before the barrier, so the peers are told at once (ABORT).",
                   remedy="Bootstrap again in a new process: `clusterfsm serve "
                          "--supervise` or supervise_ranks restarts the rank for you."),
        ErrorState("group_init_failed", GroupInitFailed,
                   doc="mx.distributed.init raised (connection refused, RDMA error).",
                   remedy="Read the cause; check the data-plane addresses and ports."),
        ErrorState("group_size_mismatch", GroupSizeMismatch,
                   doc="MLX returned a group of the wrong size (its silent size-1 answer "
                       "to a bad configuration).",
                   remedy="A bug or a broken MLX install; report it with the trace."),
        ErrorState("group_init_timeout", GroupInitTimeout,
                   doc="Group init did not finish in time: the barrier stalled, or "
                       "mx.distributed.init hung (then the watchdog killed the rank and "
                       "wrote this state into its trace).",
                   remedy="A peer never called init; restart all ranks (a hung init "
                          "needs a new process)."),
        ErrorState("confirmation_timeout", ConfirmationTimeout,
                   doc="Not every rank confirmed its group in time.",
                   remedy="A rank failed or hung after init; check its trace."),
        ErrorState("peer_lost", PeerLost,
                   doc="After ready, a peer's heartbeats stopped or its link closed.",
                   remedy="The group is unusable; restart the cluster (new session)."),
    ],
)

# ClusterError.state asks this table (the one the runner moves by).
bind_error_states(BOOTSTRAP)
