"""Where the app may send a connection's credentials: instance URLs are checked when a connection
is added, and the address every outbound connection resolves to is checked before it is made.

A connection's URL receives its OAuth client secret and password. Pointed at a cloud metadata
service (169.254.169.254 and friends) it would hand those, or the app's own managed-identity
tokens, to whoever controls the answer; pointed at loopback it reaches the host's own services.

* A ServiceNow cloud instance (``*.service-now.com``) answers on 443 only: another port is refused.
* Always refused, whatever the connection (``UnsafeAddressError``): link-local addresses (which
  hold the metadata services), the known metadata addresses and names, unspecified, multicast and
  broadcast addresses, and IPv4 written in a form other than a dotted quad (``2130706433``,
  ``0x7f000001``, ``0177.0.0.1``), which only ever hides an address. IPv4 embedded in IPv6
  (``::ffff:169.254.169.254``, NAT64, 6to4) is judged as the IPv4 address it carries.
* Loopback (127.0.0.0/8, ::1) is refused unless the app setting ``ALLOW_LOOPBACK_INSTANCES`` is
  true, which only a local test stack sets.
* Private networks (10/8, 172.16/12, 192.168/16, fc00::/7) are what a private instance is on:
  allowed.

The connection-time check (``guard_transport``) resolves the host itself, refuses the connection
if any address is refused, and connects to the very address it checked, so a DNS answer that
changes between the check and the connect (rebinding) cannot slip through. Behind an outbound
proxy (``HTTPS_PROXY``) the proxy resolves the host: then only the checks at add time apply.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from shared_code.errors import UnsafeAddressError, shown

ALLOW_LOOPBACK_SETTING = "ALLOW_LOOPBACK_INSTANCES"
SAAS_HOST_SUFFIXES = (".service-now.com", ".servicenow.com")
SAAS_PORT = 443

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
        "metadata.packet.net",
    }
)
"""Names of cloud metadata services (their addresses are refused as well, whatever the name)."""
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # Azure IMDS, AWS, GCP, OCI, ...
        "168.63.129.16",  # Azure WireServer (host agent)
        "100.100.100.200",  # Alibaba Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
    )
)
_NEVER = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("224.0.0.0/4"),
    ipaddress.ip_network("240.0.0.0/4"),
    ipaddress.ip_network("::/128"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("ff00::/8"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, IPv4-compatible), else itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (int(address) >> 32 == 0 and int(address) > 1):  # NAT64, ::a.b.c.d
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _refusal(address: IPAddress, *, allow_loopback: bool) -> tuple[str, str] | None:
    """(the address as shown, why it is refused), or None when it is allowed."""
    effective = embedded_ipv4(address)
    shown_as = str(address) if effective == address else f"{address} (IPv4 {effective})"
    if effective in METADATA_ADDRESSES:
        return shown_as, "is a cloud metadata service"
    if any(effective in network for network in _NEVER):  # 240.0.0.0/4 holds the broadcast address
        return shown_as, "is a link-local, unspecified, multicast or reserved address"
    if effective.is_loopback and not allow_loopback:
        return shown_as, (
            "is a loopback address (allowed only for local testing, with the app setting "
            f"{ALLOW_LOOPBACK_SETTING}=true)"
        )
    return None


def address_problem(address: IPAddress, *, allow_loopback: bool) -> str | None:
    """Why the app must not connect to ``address``, or None when it may."""
    refusal = _refusal(address, allow_loopback=allow_loopback)
    return None if refusal is None else f"{refusal[0]} {refusal[1]}"


def host_literal(host: str) -> IPAddress | None:
    """The address ``host`` writes literally (``[...]`` stripped), or None for a name.

    Raises UnsafeAddressError for IPv4 in any form but a dotted quad: ``2130706433``,
    ``0x7f000001``, ``0177.0.0.1`` and ``127.1`` all mean 127.0.0.1 to a resolver.
    """
    text = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    try:
        packed = socket.inet_aton(text)
    except (OSError, ValueError):
        return None
    raise UnsafeAddressError(
        f"host {shown(host)} is the IPv4 address {ipaddress.IPv4Address(packed)} written in another "
        "form: write an address as a dotted quad (a.b.c.d), or use a host name"
    )


def url_problem(url: str, *, private_instance: bool) -> str | None:
    """What is wrong with an instance URL, judged without the network (None: nothing).

    The addresses a name resolves to are judged by ``check_destination`` (when the connection is
    added) and by the guarded transport (on every connection).
    """
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower().rstrip(".")
    try:
        port = parts.port
    except ValueError:
        return "has an invalid port (use a number from 1 to 65535, or none for 443)"
    if not private_instance:
        if not host.endswith(SAAS_HOST_SUFFIXES):
            return (
                f"host {shown(host)} is not a *.service-now.com or *.servicenow.com instance; "
                "mark the connection as a private instance to allow it"
            )
        if port not in (None, SAAS_PORT):
            return f"port {port} is not the port of a ServiceNow cloud instance: use 443 (or none)"
        return None
    if host in METADATA_HOSTS:
        return f"host {shown(host)} is a cloud metadata service"
    try:
        literal = host_literal(host)
    except UnsafeAddressError as exc:
        return str(exc)
    if literal is not None:
        return address_problem(literal, allow_loopback=True)  # loopback: judged at add and connect time
    return None


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def resolved_addresses(host: str, port: int, resolve: Resolver | None = None) -> list[IPAddress]:
    """The addresses ``host`` stands for: itself when it is one (no lookup), else its DNS answer."""
    literal = host_literal(host)
    if literal is not None:
        return [literal]
    name = host.lower().rstrip(".")
    if name in METADATA_HOSTS:
        raise UnsafeAddressError(f"host {shown(host)} is a cloud metadata service")
    answers = (resolve or _system_resolver)(host, port)
    return [ipaddress.ip_address(answer.split("%", 1)[0]) for answer in answers]


def check_destination(
    host: str, port: int, *, allow_loopback: bool, resolve: Resolver | None = None
) -> list[IPAddress]:
    """The addresses of ``host``, all of them allowed; UnsafeAddressError naming the first that is
    not. OSError (socket.gaierror) when the name does not resolve."""
    name = host.lower().rstrip(".")
    if not allow_loopback and (name in _LOOPBACK_NAMES or name.endswith(".localhost")):
        raise UnsafeAddressError(
            f"host {shown(host)} is this machine (allowed only for local testing, with the app setting "
            f"{ALLOW_LOOPBACK_SETTING}=true)"
        )
    addresses = resolved_addresses(host, port, resolve)
    literal = len(addresses) == 1 and str(addresses[0]) == host.strip("[]")
    for address in addresses:
        refusal = _refusal(address, allow_loopback=allow_loopback)
        if refusal is None:
            continue
        if literal:
            raise UnsafeAddressError(f"refusing to connect to {refusal[0]}: it {refusal[1]}")
        raise UnsafeAddressError(
            f"refusing to connect to {shown(host)}: it resolves to {refusal[0]}, which {refusal[1]}"
        )
    return addresses


class GuardedBackend(httpcore.NetworkBackend):
    """An httpcore network backend that connects only to addresses ``check_destination`` allows,
    and to the address it checked (the TLS server name stays the URL's host)."""

    def __init__(
        self, inner: httpcore.NetworkBackend, *, allow_loopback: bool, resolve: Resolver | None = None
    ) -> None:
        self._inner = inner
        self._allow_loopback = allow_loopback
        self._resolve = resolve

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = check_destination(
                host, port, allow_loopback=self._allow_loopback, resolve=self._resolve
            )
        except OSError as exc:  # the name does not resolve: what the plain backend would say
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None  # a resolver answers with at least one address or raises
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return self._inner.connect_unix_socket(path, timeout, socket_options)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def guard_transport(
    transport: httpx.HTTPTransport, *, allow_loopback: bool, resolve: Resolver | None = None
) -> httpx.HTTPTransport:
    """``transport`` with its connection pool connecting through ``GuardedBackend``."""
    pool = transport._pool  # httpx builds the pool; httpcore lets its backend be swapped
    backend = getattr(pool, "_network_backend", None)
    if not isinstance(pool, httpcore.ConnectionPool) or backend is None:
        raise TypeError("guard_transport needs an httpx.HTTPTransport without a proxy")
    pool._network_backend = GuardedBackend(backend, allow_loopback=allow_loopback, resolve=resolve)
    return transport
