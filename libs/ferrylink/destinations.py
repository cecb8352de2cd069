"""Which hosts Ferrylink may connect to on an administrator's say-so (partner hosts and
URLs): a partner pointing at internal addresses would turn the transfer log's connect
errors into a port scanner.

Loopback, link-local (cloud metadata lives there), unspecified and multicast addresses are
denied unless the allow list names them; the deny list adds more. Entries are networks
(`10.0.0.0/8`, `127.0.0.1`) or host names (`sftp.bank.example`). A host name is resolved
and every address it resolves to must pass.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ALWAYS_DENIED = ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8",
                 "::/128", "224.0.0.0/4", "ff00::/8", "::ffff:127.0.0.0/104")  # fmt: skip


class DestinationRefused(ValueError):
    pass


def _resolve(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})


def _split(entries: Iterable[str]) -> tuple[list[Network], set[str]]:
    networks: list[Network] = []
    names: set[str] = set()
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return networks, names


@dataclass
class DestinationPolicy:
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    resolve: Callable[[str], list[str]] = _resolve

    @classmethod
    def from_settings(cls, allow: str, deny: str) -> DestinationPolicy:
        return cls(allow=allow.split(","), deny=deny.split(","))

    def check_host(self, host: str) -> None:
        """Raise DestinationRefused (with the reason) unless `host` may be connected to."""
        host = host.strip().strip("[]").lower().rstrip(".")
        if not host:
            raise DestinationRefused("no host given")
        allow_nets, allow_names = _split(self.allow)
        deny_nets, deny_names = _split([*ALWAYS_DENIED, *self.deny])
        if host in deny_names:
            raise DestinationRefused(f"host {host!r} is on the deny list")
        if host in allow_names:
            return
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = [ipaddress.ip_address(a.split("%")[0]) for a in self.resolve(host)]
            except OSError:
                return  # cannot judge a name that does not resolve (yet); connecting will fail
        for address in addresses:
            allowed = any(address in net for net in allow_nets)
            denied = next((net for net in deny_nets if address in net), None)
            if denied is not None and not allowed:
                raise DestinationRefused(
                    f"host {host!r} ({address}) is in the denied network {denied}; "
                    "add it to FERRYLINK_PARTNER_ALLOW if this is intended"
                )

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise DestinationRefused("the url must start with http:// or https://")
        if parts.username or parts.password:
            raise DestinationRefused("put credentials in the partner's fields, not in the url")
        self.check_host(parts.hostname or "")
