"""One ClientHello must not run ``on_resume`` thousands of times.

OpenSSL calls the session-ticket decrypt callback once per identity in a
TLS 1.3 pre_shared_key extension, and a 63 KB ClientHello holds 9,000
one-byte identities: without a bound, ``on_resume`` (Python, holding the
GIL) ran 9,000 times for one connection.  tlsctl runs it at most
``TLSCTL_MAX_RESUME_CALLS`` times per connection; identities past the bound
are never used to resume.

The hellos are built byte by byte (``bench/clienthello.py``, on the path
through pytest's ``pythonpath``) and fed to a real server ``SSLObject``
over memory BIOs.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import clienthello as ch
import tlsctl
from conftest import bio_pair, connect
from tlsctl import ResumeStatus, TicketDecision, TicketStatus, scenarios
from tlsctl._bind import lib

# The C constant of the fix; 8 until it exists, so these tests run (and
# show the amplification) against code without it.
MAX_RESUME_CALLS: int = getattr(lib, "TLSCTL_MAX_RESUME_CALLS", 8)
JUNK = 9000


class ResumeCalls:
    """An ``on_resume`` that records its statuses: resumes a ticket that
    decrypted (USE_RENEW), gives a full handshake otherwise (IGNORE_RENEW)."""

    def __init__(self) -> None:
        self.statuses: list[TicketStatus] = []

    def __call__(
        self, conn: Any, appdata: bytes | None, status: ResumeStatus
    ) -> TicketDecision:
        self.statuses.append(status.code)
        if status.decrypted:
            return TicketDecision.USE_RENEW
        return TicketDecision.IGNORE_RENEW


@pytest.fixture(scope="module")
def certs() -> scenarios.Certs:
    return scenarios.make_certs(client_sans=1)


@pytest.fixture(scope="module")
def junk_hello() -> bytes:
    """9,000 one-byte identities: a ~63 KB hello in four records."""
    hello = ch.records(ch.client_hello(ch.junk_identities(JUNK)))
    assert 60_000 < len(hello) < 65_536
    return hello


def serve(server: ssl.SSLContext, hello: bytes) -> tuple[ssl.SSLObject, bytes]:
    """Feed ``hello`` to a new server connection of ``server``; returns it
    and what it answered.  The answer must be a whole first flight: the
    server then waits for the client's Finished."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = server.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(hello)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return conn, outgoing.read()


def resumes(answer: bytes) -> bool:
    """The ServerHello at the front of ``answer`` accepts a PSK."""
    return ch.PRE_SHARED_KEY in ch.server_hello_extensions(answer)


def test_junk_identities_run_on_resume_at_most_the_bound(
    certs: scenarios.Certs, junk_hello: bytes
) -> None:
    calls = ResumeCalls()
    server = tlsctl.set_ticket_callbacks(
        scenarios.server_context(certs), on_resume=calls
    )
    conn, answer = serve(server, junk_hello)
    # The hello is valid: the server answered with a full handshake.
    assert not resumes(answer)
    assert not conn.session_reused
    assert len(calls.statuses) <= MAX_RESUME_CALLS, (
        f"on_resume ran {len(calls.statuses)} times for one ClientHello"
    )
    assert set(calls.statuses) <= {TicketStatus.NO_DECRYPT}


def test_junk_identities_without_callbacks_get_a_full_handshake(
    certs: scenarios.Certs, junk_hello: bytes
) -> None:
    """The control: a stock context answers the same hello the same way."""
    conn, answer = serve(scenarios.server_context(certs), junk_hello)
    assert not resumes(answer)
    assert not conn.session_reused


def test_a_real_resumption_calls_on_resume_once_and_resumes(
    certs: scenarios.Certs,
) -> None:
    calls = ResumeCalls()
    server = tlsctl.set_ticket_callbacks(
        scenarios.server_context(certs), on_resume=calls
    )
    client = scenarios.client_context(certs)
    session = connect(server, client).client.session
    assert session is not None and session.has_ticket
    assert calls.statuses == []
    pair = connect(server, client, session, b"y")
    assert pair.client.session_reused and pair.server.session_reused
    assert calls.statuses == [TicketStatus.SUCCESS_RENEW]


# ------------------------------------------- a real ticket behind junk


def _der_items(data: bytes) -> list[bytes]:
    """The contents of the DER TLVs in ``data``, in order."""
    items = []
    while data:
        length, offset = data[1], 2
        if length & 0x80:  # long form: the next (length & 0x7F) bytes
            count = length & 0x7F
            length = int.from_bytes(data[2 : 2 + count], "big")
            offset += count
        items.append(data[offset : offset + length])
        data = data[offset + length :]
    return items


def _psk_of(ticket: bytes, key: tlsctl.TicketKey) -> tuple[bytes, str]:
    """The resumption PSK sealed in a real ``ticket`` issued under ``key``
    (an 80-byte key: name, HMAC-SHA256 secret, AES-256-CBC key) and the hash
    of the session's cipher suite.

    OpenSSL's ticket: key name (16), IV (16), the encrypted DER of the
    SSL_SESSION, HMAC (32).  SSL_SESSION_ASN1 starts version, ssl_version,
    cipher (2 bytes), session_id, master_key; for a TLS 1.3 ticket the
    master key is the PSK (RFC 8446, 4.6.1), which the server computes
    before it seals the session.
    """
    raw = key.export()
    name, hmac_key, aes_key = raw[:16], raw[16:48], raw[48:80]
    assert ticket[:16] == name
    mac = hmac.HMAC(hmac_key, hashes.SHA256())
    mac.update(ticket[:-32])
    mac.verify(ticket[-32:])
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(ticket[16:32])).decryptor()
    padded = decryptor.update(ticket[32:-32]) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    der = unpadder.update(padded) + unpadder.finalize()
    (session,) = _der_items(der)
    _version, _ssl_version, cipher, _session_id, master_key = _der_items(session)[:5]
    suite = int.from_bytes(cipher[-2:], "big")
    return master_key, "sha384" if suite == ch.TLS_AES_256_GCM_SHA384 else "sha256"


def _ticket_behind_junk(
    certs: scenarios.Certs, junk: int
) -> tuple[ssl.SSLContext, ResumeCalls, bytes]:
    """A callback context, its ``on_resume`` and a ClientHello offering
    ``junk`` junk identities and then a real ticket of that context, with
    a valid binder for it: OpenSSL resumes it unless told not to."""
    key = tlsctl.TicketKey.generate()
    server = tlsctl.set_ticket_keys(scenarios.server_context(certs), [key])
    calls = ResumeCalls()
    tlsctl.set_ticket_callbacks(server, on_resume=calls)
    client = scenarios.client_context(certs)
    session = connect(server, client).client.session
    assert session is not None and session.has_ticket
    # The ticket, as the client presents it: from its own resumption hello.
    offer = bio_pair(server, client, session=session)
    with pytest.raises(ssl.SSLWantReadError):
        offer.client.do_handshake()
    (ticket,) = ch.offered_psk_identities(offer.c_out.read())
    psk, hash_name = _psk_of(ticket.identity, key)

    identities: Sequence[ch.PskIdentity] = [*ch.junk_identities(junk), ticket]
    size = len(ch.resumption_binder(psk, b"", hash_name))
    binders = [bytes(size)] * len(identities)  # placeholders, same size
    hello = ch.client_hello(identities, binders)
    truncated = hello[: -len(ch.binders_block(binders))]
    binders[-1] = ch.resumption_binder(psk, truncated, hash_name)
    return server, calls, ch.records(truncated + ch.binders_block(binders))


def test_a_real_ticket_within_the_bound_resumes(certs: scenarios.Certs) -> None:
    """The control of the next test: the crafted binder is valid."""
    server, calls, hello = _ticket_behind_junk(certs, MAX_RESUME_CALLS - 1)
    conn, answer = serve(server, hello)
    assert resumes(answer) and conn.session_reused
    assert calls.statuses == [TicketStatus.NO_DECRYPT] * (MAX_RESUME_CALLS - 1) + [
        TicketStatus.SUCCESS_RENEW
    ]


def test_a_real_ticket_past_the_bound_is_not_used(certs: scenarios.Certs) -> None:
    server, calls, hello = _ticket_behind_junk(certs, MAX_RESUME_CALLS)
    conn, answer = serve(server, hello)
    assert not resumes(answer) and not conn.session_reused, (
        f"a ticket behind {MAX_RESUME_CALLS} junk identities resumed"
    )
    assert calls.statuses == [TicketStatus.NO_DECRYPT] * MAX_RESUME_CALLS
