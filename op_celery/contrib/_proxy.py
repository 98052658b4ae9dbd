"""Whose request is this: the end user's IP address and user agent, as the integrations see them.

One implementation for every framework. The client's address is the socket's peer, unless
that peer is a proxy you trust, in which case ``X-Forwarded-For`` says whom it forwards for.
Every proxy *appends* the address it received the request from, so everything left of what your
own proxies wrote was written by the client and may be anything. The chain is therefore read
from the right, ``[X-Forwarded-For entries ..., socket peer]``, skipping trusted hops; the first
hop that is not trusted is the client.

``trusted_proxies`` is one of:

- ``None``, ``0`` or ``[]`` (the default): trust no proxy; the socket's peer is the client and
  ``X-Forwarded-For`` is ignored.
- IP addresses and networks, ``["10.0.0.0/8", "192.0.2.10"]`` (a comma-separated string also
  works): skip every hop inside them, from the right. If every hop is trusted, the left-most is
  the client.
- A number of hops ``n``: ``n`` proxies stand in front of the app, each appending one entry, so
  the client is the ``n``-th entry from the right. A header with fewer entries did not pass
  through all of them and is ignored (the peer is used), as Werkzeug's ``ProxyFix`` does. This is
  the mode for a proxy that reaches the app over a Unix socket, where there is no peer address.

An address that cannot be read (``unknown``, a hostname, garbage) is never used: if the hop
that would be the client is one, the client IP is ``None`` and events carry none, rather than
a guess. ``1.2.3.4:5678`` and ``[2001:db8::1]:5678`` are read without the port; IPv4-mapped
IPv6 addresses (``::ffff:1.2.3.4``) as IPv4. A server option that already rewrites the peer
from the header (uvicorn ``--proxy-headers``, Werkzeug ``ProxyFix``) should be used *instead* of
``trusted_proxies``, not with it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from .._context import RequestContext
from .._events import MAX_USER_AGENT_CHARS
from .._exceptions import ConfigurationError

__all__ = [
    "TrustedProxies",
    "TrustedProxiesSetting",
    "clean_user_agent",
    "context_from_environ",
    "context_from_scope",
    "parse_address",
]

#: What ``trusted_proxies`` accepts: a hop count, or IP addresses / networks.
TrustedProxiesSetting: TypeAlias = int | str | Iterable[str] | None

_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_address(text: str | None) -> _Address | None:
    """The IP address in ``text`` (an address, with or without a port), else ``None``."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):  # "[2001:db8::1]" or "[2001:db8::1]:443"
        end = text.find("]")
        if end == -1:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # "203.0.113.7:51234"; bare IPv6 has at least two colons
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """Which peers may tell, in ``X-Forwarded-For``, whom they forward for (module docstring)."""

    __slots__ = ("_hops", "_networks")

    def __init__(self, trusted: TrustedProxiesSetting = None) -> None:
        self._hops = 0
        self._networks: tuple[_Network, ...] = ()
        if trusted is None:
            return
        if isinstance(trusted, bool) or (isinstance(trusted, int) and trusted < 0):
            raise ConfigurationError(
                "trusted_proxies must be a number of proxy hops (0 or more) or a list of IP "
                f"addresses and networks, got {trusted!r}"
            )
        if isinstance(trusted, int):
            self._hops = trusted
            return
        entries = trusted.split(",") if isinstance(trusted, str) else list(trusted)
        networks: list[_Network] = []
        for entry in entries:
            if not isinstance(entry, str):
                raise ConfigurationError(
                    f"trusted_proxies must hold IP addresses or networks as strings, got {entry!r}"
                )
            if not entry.strip():
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ConfigurationError(
                    f"trusted_proxies: {entry!r} is not an IP address or network such as "
                    "'10.0.0.0/8' (for a number of proxy hops, pass an int)"
                ) from None
        self._networks = tuple(networks)

    def __repr__(self) -> str:
        if self._hops:
            return f"TrustedProxies({self._hops})"
        return f"TrustedProxies({[str(network) for network in self._networks]!r})"

    def trusts(self, address: _Address) -> bool:
        """Whether ``address`` is inside one of the trusted networks."""
        return any(address in network for network in self._networks)

    def client_ip(
        self, peer: str | None, forwarded_for: str | Iterable[str] | None = None
    ) -> str | None:
        """The end user's address, normalised (``"203.0.113.7"``), or ``None`` if unknown.

        ``peer`` is the socket's peer (``REMOTE_ADDR``, the ASGI ``client``); ``forwarded_for``
        the ``X-Forwarded-For`` value, or its values in order if the header came several times.
        """
        if self._hops:
            hops = _forwarded_entries(forwarded_for)
            if len(hops) >= self._hops:
                return _text(parse_address(hops[-self._hops]))
            return _text(parse_address(peer))
        peer_address = parse_address(peer)
        if peer_address is None or not self._networks or not self.trusts(peer_address):
            return _text(peer_address)
        hops = _forwarded_entries(forwarded_for)
        address: _Address = peer_address
        for entry in reversed(hops):
            hop = parse_address(entry)
            if hop is None:
                return None  # an unreadable hop: whatever is left of it is the client's word
            address = hop
            if not self.trusts(hop):
                return str(hop)
        return str(address)  # every hop is a trusted proxy: the left-most is the client


def _forwarded_entries(forwarded_for: str | Iterable[str] | None) -> list[str]:
    if forwarded_for is None:
        return []
    values = [forwarded_for] if isinstance(forwarded_for, str) else list(forwarded_for)
    return [entry for value in values for entry in value.split(",") if entry.strip()]


def _text(address: _Address | None) -> str | None:
    return None if address is None else str(address)


def clean_user_agent(raw: str | None) -> str | None:
    """The user agent as forwarded: control characters made spaces, cut to the length
    ``.delay()`` accepts, so a strange header can never make a view's ``.delay()`` raise."""
    if not raw:
        return None
    cut = raw[:MAX_USER_AGENT_CHARS]
    cleaned = "".join(" " if ch < " " or ch == "\x7f" else ch for ch in cut).strip()
    return cleaned or None


def context_from_environ(environ: Mapping[str, Any], proxies: TrustedProxies) -> RequestContext:
    """The context of a WSGI request (a WSGI environ, or Django's ``request.META``)."""
    return RequestContext(
        client_ip=proxies.client_ip(
            environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR")
        ),
        user_agent=clean_user_agent(environ.get("HTTP_USER_AGENT")),
    )


def context_from_scope(scope: Mapping[str, Any], proxies: TrustedProxies) -> RequestContext:
    """The context of an ASGI ``http`` or ``websocket`` connection scope."""
    client: Sequence[Any] | None = scope.get("client")
    peer = str(client[0]) if client else None
    forwarded: list[str] = []
    user_agent: str | None = None
    for name, value in scope.get("headers") or ():
        # ASGI header names are lower-case bytes; values are bytes, read as HTTP's latin-1.
        if name == b"x-forwarded-for":
            forwarded.append(value.decode("latin-1"))
        elif name == b"user-agent" and user_agent is None:
            user_agent = value.decode("latin-1")
    return RequestContext(
        client_ip=proxies.client_ip(peer, forwarded),
        user_agent=clean_user_agent(user_agent),
    )
