"""Who may associate: the called AE title, and known (calling AE title, address) pairs.

Checked when the A-ASSOCIATE-RQ has arrived (pynetdicom's ``EVT_REQUESTED``, before
presentation contexts are negotiated); a refusal is an A-ASSOCIATE-RJ, result 1
(rejected-permanent), source 1 (DICOM UL service-user), with the reason that names it
(PS3.8 9.3.4, Table 9-21):

- reason 7, called-AE-title-not-recognized: the request names another AE title than the
  node's (``Settings.ae_title``), unless ``Settings.accept_any_called_aet``;
- reason 3, calling-AE-title-not-recognized: peers are configured and the calling AE
  title is not one of them, or comes from an address its entry does not allow.

Peers are ``Settings.allowed_peers`` entries ``AE_TITLE@ADDRESS`` or
``AE_TITLE@NETWORK/PREFIX`` (``CR1@10.1.2.3``, ``PACS@10.20.0.0/16``, ``MOD@2001:db8::/32``;
an AE title alone, ``CR1``, allows any address), plus the AE titles of
``Settings.allowed_calling_aets`` from any address. Neither set: any calling AE title.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from pynetdicom.events import Event

from fracture_triage.settings import Settings

logger = logging.getLogger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: PS3.8 Table 9-21: result rejected-permanent, source DICOM UL service-user.
REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
CALLING_AE_NOT_RECOGNIZED = 0x03
CALLED_AE_NOT_RECOGNIZED = 0x07


@dataclass(frozen=True)
class Peer:
    """One allowed peer: its calling AE title and the network it may call from."""

    ae_title: str
    #: ``None``: any address.
    network: IpNetwork | None

    def allows(self, ae_title: str, address: str) -> bool:
        if ae_title != self.ae_title:
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:  # not an IP address (a Unix socket, say): not this network's
            return False

    def __str__(self) -> str:
        return self.ae_title if self.network is None else f"{self.ae_title}@{self.network}"


def parse_peer(entry: str) -> Peer:
    """``AE_TITLE[@ADDRESS[/PREFIX]]`` as a :class:`Peer`; ``ValueError`` names what is wrong."""
    ae_title, sep, where = entry.strip().rpartition("@")
    if not sep:
        ae_title, where = where, ""
    ae_title = ae_title.strip()
    # PS3.5 Table 6.2-1: AE is 1-16 characters, no backslash, not all spaces.
    if not 0 < len(ae_title) <= 16 or "\\" in ae_title:
        raise ValueError(f"peer {entry!r}: the AE title must be 1-16 characters")
    if not where:
        return Peer(ae_title, None)
    try:
        network = ipaddress.ip_network(where.strip(), strict=False)
    except ValueError as exc:
        raise ValueError(f"peer {entry!r}: {exc}") from None
    return Peer(ae_title, network)


@dataclass(frozen=True)
class Policy:
    ae_title: str
    accept_any_called_aet: bool
    peers: tuple[Peer, ...]

    def refusal(self, calling: str, called: str, address: str) -> tuple[int, str] | None:
        """The A-ASSOCIATE-RJ reason and why, or ``None`` when the request may go on."""
        if not self.accept_any_called_aet and called != self.ae_title:
            return CALLED_AE_NOT_RECOGNIZED, f"called AE title {called!r} is not {self.ae_title!r}"
        if self.peers and not any(p.allows(calling, address) for p in self.peers):
            known = any(p.ae_title == calling for p in self.peers)
            why = "not allowed from this address" if known else "not a configured peer"
            return CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} is {why}"
        return None


def policy(settings: Settings) -> Policy:
    """The node's :class:`Policy`; ``ValueError`` for a malformed peer entry."""
    peers = [parse_peer(e) for e in settings.allowed_peers]
    peers += [Peer(a.strip(), None) for a in settings.allowed_calling_aets]
    return Policy(settings.ae_title.strip(), settings.accept_any_called_aet, tuple(peers))


def handle_requested(event: Event, rules: Policy) -> None:
    """``EVT_REQUESTED``: refuse a request :meth:`Policy.refusal` names (see module doc)."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    if request is None:
        return
    calling = str(request.calling_ae_title).strip()
    called = str(request.called_ae_title).strip()
    address = str(assoc.requestor.address)
    refused = rules.refusal(calling, called, address)
    if refused is None:
        return
    reason, why = refused
    logger.warning(
        "refused association from %s@%s: %s (A-ASSOCIATE-RJ reason %d)",
        calling,
        address,
        why,
        reason,
    )
    assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, reason)
    assoc.kill()


__all__ = ["Peer", "Policy", "handle_requested", "parse_peer", "policy"]
