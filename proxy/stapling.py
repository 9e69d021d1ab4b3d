"""OCSP stapling: a DER OCSP response checked against its certificate, served while it is valid.

Where responses come from: a file named like the certificate plus `.ocsp` (HAProxy's convention)
or the routes file's `ocsp:` key, read whenever the certificate is read (start, reload); see
config/routes_file.py. A changed response is part of the context cache key, so the next publish
builds a new context with it.

Checked once, when the context is built (`StapledResponse.prepare`): the response must parse, be
SUCCESSFUL, and name this certificate (serial number, issuer name hash, and the issuer key hash
when the chain carries the issuer). A response that fails is never stapled and the build reports
it once as a problem. Checked per handshake, and only when the client asked for a status
(status_request): thisUpdate <= now < nextUpdate (a response without nextUpdate is taken as
valid from thisUpdate on, RFC 6960 §2.4). Outside that window nothing is stapled, which clients
treat like a server that does not staple, and the first such handshake logs a warning once.
A stapled response is whatever the CA said (good, revoked or unknown): hiding a revocation would
only postpone the client's own check.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import ocsp

LOG = logging.getLogger("ingress_proxy.stapling")

Clock = Callable[[], datetime.datetime]


class OcspMismatch(ValueError):
    """This response cannot be stapled for this certificate; str() says why."""


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # cryptography 38 uses naive UTC


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize()


@dataclass
class StapledResponse:
    der: bytes = field(repr=False)
    this_update: datetime.datetime
    next_update: datetime.datetime | None
    origin: str  # the certificate's origin, for the log line
    _reported: bool = False

    @classmethod
    def prepare(cls, der: bytes, chain: list[x509.Certificate], origin: str) -> StapledResponse:
        """Check `der` against the leaf `chain[0]` (issuer `chain[1]` if present); OcspMismatch if unusable."""
        try:
            response = ocsp.load_der_ocsp_response(der)
        except ValueError:
            raise OcspMismatch("the OCSP file is not a DER OCSP response (fetch it with `openssl ocsp ... -respout FILE`)") from None
        if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise OcspMismatch(f"the OCSP response status is {response.response_status.name} (fetch a fresh response)")
        leaf = chain[0]
        if response.serial_number != leaf.serial_number:
            raise OcspMismatch("the OCSP response is for another certificate (serial number differs)")
        if response.issuer_name_hash != _digest(response.hash_algorithm, leaf.issuer.public_bytes()):
            raise OcspMismatch("the OCSP response is for another certificate (issuer name differs)")
        if len(chain) > 1:  # with the issuer at hand, its key hash must match too (RFC 6960 §4.1.1)
            expected = ocsp.OCSPRequestBuilder().add_certificate(leaf, chain[1], response.hash_algorithm).build()
            if response.issuer_key_hash != expected.issuer_key_hash:
                raise OcspMismatch("the OCSP response is for another certificate (issuer key differs)")
        return cls(der, response.this_update, response.next_update, origin)

    def for_handshake(self, now: Clock = _utc_now) -> bytes:
        """The DER to staple now, or b"" (no staple) outside thisUpdate <= now < nextUpdate."""
        moment = now()
        if self.this_update <= moment and (self.next_update is None or moment < self.next_update):
            return self.der
        if not self._reported:
            self._reported = True
            LOG.warning(
                "%s: OCSP response not stapled: valid %s to %s, now %s (refresh the .ocsp file, then reload)",
                self.origin, self.this_update.isoformat(), self.next_update.isoformat() if self.next_update else "-", moment.isoformat(),
            )
        return b""

