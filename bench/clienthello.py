"""TLS 1.3 ClientHello messages built byte by byte, for tests and the benchmark.

A client made with ``ssl`` cannot send what an attacker sends: thousands of
PSK identities in one ClientHello.  ``client_hello`` writes the message
itself, following RFC 8446:

* 4 (handshake message header), 4.1.2 (ClientHello body);
* 4.2 (extension block, at most 2^16-1 bytes), 4.2.1 supported_versions,
  4.2.3 signature_algorithms, 4.2.7 supported_groups, 4.2.8 key_share
  (x25519, a real public key), 4.2.9 psk_key_exchange_modes, and 4.2.11
  pre_shared_key, which must come last;
* 4.2.11.2 PSK binders, computed with the key schedule of 7.1
  (``resumption_binder``);
* 5.1 record layer (``records``: TLSPlaintext fragments of at most 2^14
  bytes, so a 63 KB hello spans several records);
* server_name is RFC 6066, section 3.

What OpenSSL reads of pre_shared_key (``tls_parse_ctos_psk`` in
ssl/statem/extensions_srvr.c, 1.1.1 to 3.x): each identity in turn goes to
``tls_decrypt_ticket`` (ssl/t1_lib.c), which runs the decrypt callback of
``SSL_CTX_set_session_ticket_cb`` for it (status EMPTY, NO_DECRYPT, SUCCESS
or SUCCESS_RENEW).  An identity shorter than 32 bytes (key name + IV) is
NO_DECRYPT at once; an empty one is EMPTY, which OpenSSL then rejects with a
decode_error alert.  The binders are read only once an identity decrypted,
and only up to that identity's: binders for the identities before it must
parse, its own must be the right size and verify.  A hello whose
identities are all junk therefore needs no binder of each: RFC 8446 wants
one per identity (33 bytes each at least, more than the 2^16-1 bytes of
the extension block allows for 9,000 identities), OpenSSL reads none.

``offered_psk_identities`` and ``server_hello_extensions`` read the
plaintext first flight of a real client or server.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HANDSHAKE = 22  # ContentType of a handshake record (RFC 8446, 5.1)
CLIENT_HELLO = 1  # HandshakeType (RFC 8446, 4)
SERVER_HELLO = 2
MAX_FRAGMENT = 1 << 14  # TLSPlaintext.fragment is at most 2^14 bytes

# ExtensionType values (RFC 8446, 4.2; server_name from RFC 6066).
SERVER_NAME = 0
SUPPORTED_GROUPS = 10
SIGNATURE_ALGORITHMS = 13
PRE_SHARED_KEY = 41
SUPPORTED_VERSIONS = 43
PSK_KEY_EXCHANGE_MODES = 45
KEY_SHARE = 51

TLS_AES_128_GCM_SHA256 = 0x1301
TLS_AES_256_GCM_SHA384 = 0x1302
TLS_CHACHA20_POLY1305_SHA256 = 0x1303
CIPHER_SUITES = (
    TLS_AES_128_GCM_SHA256,
    TLS_AES_256_GCM_SHA384,
    TLS_CHACHA20_POLY1305_SHA256,
)
X25519 = 0x001D
SIGNATURE_SCHEMES = (
    0x0804,  # rsa_pss_rsae_sha256
    0x0403,  # ecdsa_secp256r1_sha256
    0x0401,  # rsa_pkcs1_sha256
)
PSK_DHE_KE = 1


@dataclass(frozen=True)
class PskIdentity:
    """One ``PskIdentity`` (RFC 8446, 4.2.11): a ticket (or junk) and its
    obfuscated age."""

    identity: bytes
    obfuscated_ticket_age: int = 0


def junk_identities(count: int, length: int = 1) -> list[PskIdentity]:
    """``count`` random identities of ``length`` bytes (at least 1: an empty
    identity is a decode error, not a ticket that fails to decrypt)."""
    if length < 1:
        raise ValueError("a PSK identity is at least 1 byte (RFC 8446, 4.2.11)")
    return [PskIdentity(os.urandom(length)) for _ in range(count)]


def _vector(data: bytes, length_bytes: int) -> bytes:
    """A TLS vector: ``data`` after its length in ``length_bytes`` bytes."""
    if len(data) >= 1 << (8 * length_bytes):
        raise ValueError(f"{len(data)} bytes do not fit a {length_bytes}-byte length")
    return len(data).to_bytes(length_bytes, "big") + data


def _u16s(values: Sequence[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def _extension(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + _vector(data, 2)


def x25519_public_key() -> bytes:
    """A fresh X25519 public key (32 bytes)."""
    return (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def binders_block(binders: Sequence[bytes]) -> bytes:
    """``PreSharedKeyExtension.binders``: the list, after its 2-byte length;
    the last bytes of a ClientHello built by ``client_hello``."""
    return _vector(b"".join(_vector(b, 1) for b in binders), 2)


def client_hello(
    identities: Sequence[PskIdentity],
    binders: Sequence[bytes] = (bytes(32),),
    *,
    server_name: str = "localhost",
    cipher_suites: Sequence[int] = CIPHER_SUITES,
    key_share: bytes | None = None,
    random: bytes | None = None,
    session_id: bytes | None = None,
) -> bytes:
    """A ClientHello handshake message (header included) offering TLS 1.3
    only, ending with a pre_shared_key extension of ``identities`` and
    ``binders`` (default: one 32-byte binder, all OpenSSL reads when no
    identity decrypts; see the module docstring).

    ``key_share`` (an x25519 public key), ``random`` and ``session_id`` (the
    32-byte legacy_session_id of middlebox compatibility mode) are fresh
    random values unless given.
    """
    if not identities or not binders:
        raise ValueError("pre_shared_key needs at least one identity and binder")
    identity_list = b"".join(
        _vector(i.identity, 2) + i.obfuscated_ticket_age.to_bytes(4, "big")
        for i in identities
    )
    share = key_share if key_share is not None else x25519_public_key()
    host = server_name.encode("ascii")
    extensions = b"".join(
        (
            # ServerNameList: one host_name (type 0) entry.
            _extension(SERVER_NAME, _vector(b"\x00" + _vector(host, 2), 2)),
            _extension(SUPPORTED_VERSIONS, _vector(_u16s([0x0304]), 1)),
            _extension(SUPPORTED_GROUPS, _vector(_u16s([X25519]), 2)),
            # client_shares: one KeyShareEntry (group, key_exchange<1..>).
            _extension(KEY_SHARE, _vector(_u16s([X25519]) + _vector(share, 2), 2)),
            _extension(SIGNATURE_ALGORITHMS, _vector(_u16s(SIGNATURE_SCHEMES), 2)),
            _extension(PSK_KEY_EXCHANGE_MODES, _vector(bytes([PSK_DHE_KE]), 1)),
            # Last (RFC 8446, 4.2.11): identities, then binders.
            _extension(
                PRE_SHARED_KEY, _vector(identity_list, 2) + binders_block(binders)
            ),
        )
    )
    body = b"".join(
        (
            (0x0303).to_bytes(2, "big"),  # legacy_version
            random if random is not None else os.urandom(32),
            _vector(session_id if session_id is not None else os.urandom(32), 1),
            _vector(_u16s(cipher_suites), 2),
            _vector(b"\x00", 1),  # legacy_compression_methods: null only
            _vector(extensions, 2),
        )
    )
    return bytes([CLIENT_HELLO]) + _vector(body, 3)


def records(message: bytes, content_type: int = HANDSHAKE) -> bytes:
    """``message`` in TLSPlaintext records of at most 2^14 bytes each, with
    legacy_record_version 0x0301 (allowed for an initial ClientHello)."""
    out = []
    for start in range(0, len(message), MAX_FRAGMENT):
        fragment = message[start : start + MAX_FRAGMENT]
        out.append(bytes([content_type]) + b"\x03\x01" + _vector(fragment, 2))
    return b"".join(out)


# ------------------------------------------------------------ PSK binders


def _hkdf_expand_label(
    secret: bytes, label: str, context: bytes, length: int, hash_name: str
) -> bytes:
    """HKDF-Expand-Label (RFC 8446, 7.1) over HMAC-``hash_name``."""
    info = (
        length.to_bytes(2, "big")
        + _vector(b"tls13 " + label.encode("ascii"), 1)
        + _vector(context, 1)
    )
    out, block, counter = b"", b"", 1
    while len(out) < length:  # HKDF-Expand (RFC 5869, 2.3)
        block = hmac.new(secret, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def resumption_binder(psk: bytes, truncated_hello: bytes, hash_name: str) -> bytes:
    """The binder of a resumption PSK (RFC 8446, 4.2.11.2): an HMAC, with
    the finished_key of binder_key = Derive-Secret(Early Secret, "res
    binder", ""), over the hash of ``truncated_hello`` (the ClientHello
    message without its binders block, see ``binders_block``)."""
    size = hashlib.new(hash_name).digest_size
    early_secret = hmac.new(bytes(size), psk, hash_name).digest()  # HKDF-Extract
    empty_hash = hashlib.new(hash_name).digest()
    binder_key = _hkdf_expand_label(
        early_secret, "res binder", empty_hash, size, hash_name
    )
    finished_key = _hkdf_expand_label(binder_key, "finished", b"", size, hash_name)
    transcript = hashlib.new(hash_name, truncated_hello).digest()
    return hmac.new(finished_key, transcript, hash_name).digest()


# ------------------------------------------------------------ reading


def _handshake_messages(data: bytes) -> bytes:
    """The handshake bytes of the leading plaintext handshake records of
    ``data`` (stops at the first other record, e.g. ChangeCipherSpec)."""
    out = b""
    while len(data) >= 5 and data[0] == HANDSHAKE:
        length = int.from_bytes(data[3:5], "big")
        out += data[5 : 5 + length]
        data = data[5 + length :]
    return out


def _extensions(block: bytes) -> dict[int, bytes]:
    found = {}
    while block:
        ext_type = int.from_bytes(block[:2], "big")
        length = int.from_bytes(block[2:4], "big")
        found[ext_type] = block[4 : 4 + length]
        block = block[4 + length :]
    return found


def _hello_extensions(data: bytes, msg_type: int) -> dict[int, bytes]:
    """The extensions of the first handshake message of ``data`` (records),
    which must be a ClientHello or a ServerHello (``msg_type``)."""
    message = _handshake_messages(data)
    if not message or message[0] != msg_type:
        raise ValueError(f"no handshake message of type {msg_type} in front")
    body = message[4 : 4 + int.from_bytes(message[1:4], "big")]
    offset = 2 + 32  # legacy_version, random
    offset += 1 + body[offset]  # legacy_session_id(_echo)
    if msg_type == CLIENT_HELLO:
        offset += 2 + int.from_bytes(body[offset : offset + 2], "big")  # suites
        offset += 1 + body[offset]  # legacy_compression_methods
    else:
        offset += 2 + 1  # cipher_suite, legacy_compression_method
    length = int.from_bytes(body[offset : offset + 2], "big")
    return _extensions(body[offset + 2 : offset + 2 + length])


def server_hello_extensions(data: bytes) -> dict[int, bytes]:
    """The extensions of the ServerHello that ``data`` (a server's first
    flight, as records) starts with: pre_shared_key (41) is there exactly
    when the server resumes."""
    return _hello_extensions(data, SERVER_HELLO)


def offered_psk_identities(data: bytes) -> list[PskIdentity]:
    """The PSK identities (tickets) in the pre_shared_key extension of the
    ClientHello that ``data`` (a client's first flight, as records) starts
    with; ``[]`` without that extension."""
    psk = _hello_extensions(data, CLIENT_HELLO).get(PRE_SHARED_KEY)
    if psk is None:
        return []
    block = psk[2 : 2 + int.from_bytes(psk[:2], "big")]
    found = []
    while block:
        length = int.from_bytes(block[:2], "big")
        identity = block[2 : 2 + length]
        age = int.from_bytes(block[2 + length : 6 + length], "big")
        found.append(PskIdentity(identity, age))
        block = block[6 + length :]
    return found
