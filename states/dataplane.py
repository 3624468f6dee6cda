"""Which IPv4 address the ring data plane uses when the control link may be IPv6.

Why this exists: the control link (handshake, heartbeats) is ordinary TCP and works
over IPv4 and IPv6 alike, link-local addresses with a scope id (``fe80::1%en2``)
included. MLX's ring data plane does not: it opens ``AF_INET`` sockets and its hostfile
holds ``ip:port`` strings split at the first colon (docs/design.md section 3.2), so every
rank's ring address must be IPv4. The ring hostfile is built from the host each rank had
on its control connection with rank 0 (never from configuration), so that host must
name an IPv4 address. :func:`ring_host` says which one:

- an IPv4 address is itself;
- an IPv4-mapped IPv6 address (``::ffff:10.0.0.2``, what a dual-stack listener sees) is
  the IPv4 address inside it;
- the IPv6 loopback ``::1`` is ``127.0.0.1``: a peer that reached us over ``::1`` is on
  this host, where the IPv4 loopback reaches it too;
- any other IPv6 address (global, unique-local, link-local) gives no IPv4 address: the
  peer's IPv4 address is nowhere in what rank 0 learns.

That last combination (the ring backend over a remote IPv6 control link) truly cannot
work, so :func:`ring_refusal` refuses it when the configuration is built (exit 2 in
``serve``) and names the ways that do work. jaccl with ``all_gather_factory`` has no IP
data plane and is never refused here. A host name (not a literal) is resolved later;
if it resolves to such an IPv6 address, rank 0 refuses the topology in
``exchanging_bootstrap`` (``precheck_failed``, check ``data_plane_address``).
"""

from __future__ import annotations

import ipaddress

#: What the ring data plane binds when the control host gives no IPv4 address: only
#: the port reservation uses it (the run is then refused before the hostfile is made).
ANY_IPV4 = "0.0.0.0"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (a scope id ``%iface`` is dropped), or None for a name."""
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def is_ipv6_literal(host: str) -> bool:
    return isinstance(_ip(host), ipaddress.IPv6Address)


def ring_host(control_host: str) -> str | None:
    """The IPv4 address the ring data plane uses for a rank whose control link had
    ``control_host``; None when that host gives none (see the module docstring). A
    host name is returned as it is."""
    ip = _ip(control_host)
    if ip is None:
        return control_host
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.is_loopback:
        return "127.0.0.1"
    return None


def reservation_host(control_host: str) -> str:
    """Where to hold the data-plane port (an ``AF_INET`` socket, as MLX's listener)."""
    return ring_host(control_host) or ANY_IPV4


def ring_refusal(hosts: list[str]) -> str | None:
    """Why the ring data plane cannot run over control links to ``hosts``, or None.

    ``hosts`` are the configured listen and peer hosts. The unspecified address ``::``
    (listen on every address) is not refused: what it accepts is judged per peer.
    """
    for host in hosts:
        ip = _ip(host)
        if isinstance(ip, ipaddress.IPv6Address) and not ip.is_unspecified \
                and ring_host(host) is None:
            return (f"{host} is an IPv6 address, and MLX's ring data plane is IPv4 only "
                    "(it opens AF_INET sockets; its hostfile is ip:port): over an IPv6 "
                    "control link rank 0 learns no IPv4 address for the ring. Give "
                    "--listen/--peer IPv4 addresses (on a Thunderbolt bridge the "
                    "169.254 address of the same interface), or use --interface "
                    "discovery")
    return None


__all__ = ["ANY_IPV4", "is_ipv6_literal", "reservation_host", "ring_host", "ring_refusal"]
