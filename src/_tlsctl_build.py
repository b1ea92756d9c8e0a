"""cffi (API mode) builder for ``tlsctl._binding``.

Importing this file has no side effects beyond creating ``ffibuilder``;
setuptools finds it through ``cffi_modules`` in ``setup.py``.  The C source
is assembled from the grouped strings below (types, constants, functions,
customizations), the way pyca/cryptography groups its ``_cffi_src``.

The module is built WITHOUT OpenSSL headers and WITHOUT linking libssl or
libcrypto.  See ``C_HEADER_COMMENT`` for why and how.
"""

from __future__ import annotations

import sys
import sysconfig

from cffi import FFI

# --------------------------------------------------------------------------
# Constants we declare ourselves instead of including <openssl/*.h>.
# tests/test_build.py compares each with the real headers when they are
# installed.  Keys are the OpenSSL macro names.
# --------------------------------------------------------------------------
OPENSSL_CONSTANTS: dict[str, int] = {
    "TLS1_2_VERSION": 0x0303,
    "TLS1_3_VERSION": 0x0304,
    "CRYPTO_EX_INDEX_SSL": 0,
    "OPENSSL_VERSION": 0,
    "SSL_TICKET_FATAL_ERR_MALLOC": 0,
    "SSL_TICKET_FATAL_ERR_OTHER": 1,
    "SSL_TICKET_NONE": 2,
    "SSL_TICKET_EMPTY": 3,
    "SSL_TICKET_NO_DECRYPT": 4,
    "SSL_TICKET_SUCCESS": 5,
    "SSL_TICKET_SUCCESS_RENEW": 6,
    "SSL_TICKET_RETURN_ABORT": 0,
    "SSL_TICKET_RETURN_IGNORE": 1,
    "SSL_TICKET_RETURN_IGNORE_RENEW": 2,
    "SSL_TICKET_RETURN_USE": 3,
    "SSL_TICKET_RETURN_USE_RENEW": 4,
    "BIO_TYPE_FILTER": 0x0200,
    "BIO_TYPE_MEM": 0x0401,
    "BIO_FLAGS_WRITE": 0x02,
    "BIO_FLAGS_RWS": 0x07,
    "BIO_FLAGS_SHOULD_RETRY": 0x08,
    "SSL_CB_ACCEPT_LOOP": 0x2001,
    "SSL_CB_ACCEPT_EXIT": 0x2002,
    "SSL_CB_HANDSHAKE_DONE": 0x20,
    "CRYPTO_EX_INDEX_SSL_CTX": 1,
    "SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB": 72,
    "EVP_MAX_IV_LENGTH": 16,
    "SSL_SENT_SHUTDOWN": 1,
    "SSL_CLIENT_HELLO_SUCCESS": 1,
}

# OpenSSL 3.x only (<openssl/core.h>); checked when 3.x headers are installed.
OPENSSL3_CONSTANTS: dict[str, int] = {
    "OSSL_PARAM_UTF8_STRING": 4,
    "OSSL_PARAM_OCTET_STRING": 5,
}

# Functions resolved at run time: (name, C return type, C parameters,
# required).  A required symbol that is missing makes binding fail with a
# reason; an optional one becomes a capability flag (``tlsctl_has_<name>``).
OPENSSL_FUNCTIONS: list[tuple[str, str, str, bool]] = [
    ("OpenSSL_version_num", "unsigned long", "void", True),
    ("OpenSSL_version", "const char *", "int", True),
    ("TLS_method", "const SSL_METHOD *", "void", True),
    ("TLS_server_method", "const SSL_METHOD *", "void", True),
    ("TLS_client_method", "const SSL_METHOD *", "void", True),
    ("SSL_CTX_get_ssl_method", "const SSL_METHOD *", "const SSL_CTX *", True),
    ("SSL_get_SSL_CTX", "SSL_CTX *", "const SSL *", True),
    ("SSL_is_server", "int", "const SSL *", True),
    ("SSL_version", "int", "const SSL *", True),
    ("SSL_is_init_finished", "int", "const SSL *", True),
    ("SSL_session_reused", "int", "const SSL *", True),
    ("SSL_get_shutdown", "int", "const SSL *", True),
    ("SSL_CTX_set_num_tickets", "int", "SSL_CTX *, size_t", True),
    ("SSL_CTX_get_num_tickets", "size_t", "const SSL_CTX *", True),
    ("SSL_set_num_tickets", "int", "SSL *, size_t", True),
    ("SSL_get_num_tickets", "size_t", "const SSL *", True),
    (
        "SSL_CTX_set_session_ticket_cb",
        "int",
        "SSL_CTX *, tlsctl_gen_ticket_fn, tlsctl_dec_ticket_fn, void *",
        True,
    ),
    # The stash (OpenSSL 1.1.1's stand-in for SSL_new_session_ticket).
    ("SSL_state_string", "const char *", "const SSL *", True),
    ("SSL_get_wbio", "BIO *", "const SSL *", True),
    ("SSL_get_rfd", "int", "const SSL *", True),
    ("SSL_set0_wbio", "void", "SSL *, BIO *", True),
    ("SSL_set_info_callback", "void", "SSL *, tlsctl_info_fn", True),
    ("SSL_get_info_callback", "tlsctl_info_fn", "const SSL *", True),
    ("SSL_CTX_get_info_callback", "tlsctl_info_fn", "SSL_CTX *", True),
    ("BIO_get_new_index", "int", "void", True),
    ("BIO_meth_new", "BIO_METHOD *", "int, const char *", True),
    ("BIO_meth_set_write", "int", "BIO_METHOD *, tlsctl_bio_write_fn", True),
    ("BIO_meth_set_read", "int", "BIO_METHOD *, tlsctl_bio_read_fn", True),
    ("BIO_meth_set_ctrl", "int", "BIO_METHOD *, tlsctl_bio_ctrl_fn", True),
    ("BIO_meth_set_create", "int", "BIO_METHOD *, tlsctl_bio_life_fn", True),
    ("BIO_meth_set_destroy", "int", "BIO_METHOD *, tlsctl_bio_life_fn", True),
    ("BIO_new", "BIO *", "const BIO_METHOD *", True),
    ("BIO_up_ref", "int", "BIO *", True),
    ("BIO_push", "BIO *", "BIO *, BIO *", True),
    ("BIO_next", "BIO *", "BIO *", True),
    ("BIO_method_type", "int", "const BIO *", True),
    ("BIO_write", "int", "BIO *, const void *, int", True),
    ("BIO_read", "int", "BIO *, void *, int", True),
    ("BIO_ctrl", "long", "BIO *, int, long, void *", True),
    ("BIO_set_data", "void", "BIO *, void *", True),
    ("BIO_get_data", "void *", "BIO *", True),
    ("BIO_set_init", "void", "BIO *, int", True),
    ("BIO_clear_flags", "void", "BIO *, int", True),
    ("BIO_set_flags", "void", "BIO *, int", True),
    ("BIO_copy_next_retry", "void", "BIO *", True),
    ("ERR_get_error", "unsigned long", "void", True),
    ("ERR_error_string_n", "void", "unsigned long, char *, size_t", True),
    ("ERR_clear_error", "void", "void", True),
    # Ticket callbacks and shared ticket keys (see 8.).
    (
        "CRYPTO_get_ex_new_index",
        "int",
        "int, long, void *, void *, tlsctl_ex_dup_fn, tlsctl_ex_free_fn",
        True,
    ),
    ("SSL_CTX_set_ex_data", "int", "SSL_CTX *, int, void *", True),
    ("SSL_CTX_get_ex_data", "void *", "const SSL_CTX *, int", True),
    ("SSL_set_ex_data", "int", "SSL *, int, void *", True),
    ("SSL_get_ex_data", "void *", "const SSL *, int", True),
    ("SSL_get_session", "SSL_SESSION *", "const SSL *", True),
    (
        "SSL_SESSION_set1_ticket_appdata",
        "int",
        "SSL_SESSION *, const void *, size_t",
        True,
    ),
    (
        "SSL_SESSION_get0_ticket_appdata",
        "int",
        "SSL_SESSION *, void **, size_t *",
        True,
    ),
    ("SSL_CTX_callback_ctrl", "long", "SSL_CTX *, int, tlsctl_void_fn", True),
    # The context a handshake started on, for its shared keys (see 8.).
    (
        "SSL_CTX_set_client_hello_cb",
        "void",
        "SSL_CTX *, tlsctl_client_hello_fn, void *",
        True,
    ),
    ("SSL_CTX_up_ref", "int", "SSL_CTX *", True),
    ("SSL_CTX_free", "void", "SSL_CTX *", True),
    ("RAND_bytes", "int", "unsigned char *, int", True),
    ("OPENSSL_cleanse", "void", "void *, size_t", True),
    ("EVP_aes_128_cbc", "const EVP_CIPHER *", "void", True),
    ("EVP_aes_256_cbc", "const EVP_CIPHER *", "void", True),
    ("EVP_sha256", "const EVP_MD *", "void", True),
    (
        "EVP_EncryptInit_ex",
        "int",
        "EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, "
        "const unsigned char *, const unsigned char *",
        True,
    ),
    (
        "EVP_DecryptInit_ex",
        "int",
        "EVP_CIPHER_CTX *, const EVP_CIPHER *, ENGINE *, "
        "const unsigned char *, const unsigned char *",
        True,
    ),
    # The legacy ticket key callback's HMAC (deprecated in 3.0, unused there).
    (
        "HMAC_Init_ex",
        "int",
        "HMAC_CTX *, const void *, int, const EVP_MD *, ENGINE *",
        False,
    ),
    # OpenSSL >= 3.0.0 only.
    ("SSL_new_session_ticket", "int", "SSL *", False),
    (
        "SSL_CTX_set_tlsext_ticket_key_evp_cb",
        "int",
        "SSL_CTX *, tlsctl_key_evp_fn",
        False,
    ),
    ("EVP_MAC_CTX_set_params", "int", "EVP_MAC_CTX *, const OSSL_PARAM *", False),
]

C_HEADER_COMMENT = r"""
/*
 * tlsctl C shim.  Why each piece exists:
 *
 * 1. No OpenSSL headers, no -lssl.  The stdlib's _ssl module already has an
 *    OpenSSL loaded, and every SSL_CTX / SSL we touch belongs to it.  Linking
 *    our own libssl could load a SECOND copy (different structs, different
 *    locks, different ex_data tables): calling copy B's functions on copy
 *    A's objects corrupts memory.  So we declare the few opaque types,
 *    prototypes and constants we need and resolve every function at run
 *    time with dlsym() through the handle of _ssl's own shared object, which
 *    searches _ssl and the libraries IT depends on.  When _ssl is built into
 *    the interpreter, the process's global symbols are used instead.  One
 *    build therefore serves OpenSSL 1.1.1 and 3.x.
 *
 * 2. Instance proof.  Before any pointer taken from a Python object is used,
 *    tlsctl_ctx_method_kind() compares SSL_CTX_get_ssl_method(ctx) with the
 *    TLS_{,server_,client_}method() results of the bound library.  Method
 *    tables are static data inside one libssl, so equality proves the
 *    context came from the instance we bound.
 *
 * 3. Object layout.  CPython's _ssl keeps `SSL_CTX *ctx` as the first field
 *    after PyObject_HEAD of _ssl._SSLContext, and `PyObject *Socket; SSL *ssl`
 *    as the first two fields of _ssl._SSLSocket (3.9 .. 3.14).  cffi cannot
 *    name PyObject in a cdef, so Python passes id(obj) as uintptr_t and the
 *    cast lives here.  sizeof(PyObject) comes from the headers we are built
 *    against, never a hard-coded 16.
 *
 * 4. Optional functions (SSL_new_session_ticket is 3.0+) are capability
 *    flags; the wrappers refuse to call a NULL pointer.
 *
 * 5. tlsctl_dec_ticket_cb: the session-ticket decrypt callback behind
 *    renew_on_resume=False and on_resume (see 8.).  Without a Python
 *    callback it maps OpenSSL's status to the decision OpenSSL makes without
 *    a callback; renew_on_resume=False then turns USE_RENEW into USE, so a
 *    decrypted ticket resumes WITHOUT a renewal ticket.
 *
 * 6. tlsctl_queue_tickets: one C call per connection for the hot decision
 *    "is this a finished TLS 1.3 server handshake, was it resumed, queue N
 *    tickets", so the first application write pays a single crossing.
 *
 * 7. The stash (OpenSSL 1.1.1 has no SSL_new_session_ticket).  OpenSSL makes
 *    and writes its tickets as usual; a filter BIO holds the bytes back:
 *
 *    - tlsctl_stash_install(), called by the Python factory for each new
 *      server connection BEFORE its handshake (the factory defers
 *      SSLSocket._create's implicit handshake for this), puts the "tlsctl
 *      stash" filter in front of the write BIO (socket BIO or MemoryBIO) and
 *      makes tlsctl_info_cb the connection's info callback (_ssl sets none).
 *      During handshakes OpenSSL pushes its buffering BIO (bbio) on top:
 *      bbio -> stash -> transport.  We take an extra reference on the
 *      transport BIO because SSL_set0_wbio frees the SSL's reference to the
 *      old wbio; the chain now owns that reference.  Per connection, not per
 *      context, so re-patching never changes a live connection.
 *    - SSL_CB_ACCEPT_LOOP in state TLS_ST_SR_FINISHED of a TLS 1.3
 *      connection (matched by SSL_state_string "TRFIN": the enum value
 *      changed between releases): the client's Finished has been read
 *      and the state machine is about to write the tickets.  The filter
 *      starts CAPTURING: every write is appended to a heap buffer and
 *      reported as fully written, so holding tickets can never block the
 *      handshake (no deadlock).
 *    - SSL_CB_ACCEPT_EXIT once the handshake is finished (the state machine
 *      returns after writing and flushing the tickets): capturing stops.  Not
 *      SSL_CB_HANDSHAKE_DONE, which OpenSSL 3.x reports at the client's
 *      Finished, before the tickets (traced on 3.0.19).  A WANT_WRITE exit
 *      mid-flight cannot happen while capturing: captured writes succeed.
 *      The held bytes are whole TLS records, already encrypted and
 *      sequence-numbered, so they must go out first and in order: the
 *      next write of ANY record (application data, alert / close_notify,
 *      KeyUpdate) sends them and that record in ONE write, so a vanished
 *      peer cannot reset the connection between them (OpenSSL 3.5 writes
 *      an alert on an unexpected EOF; measured on Debian trixie).
 *      A partial drain returns a retry, exactly like a slow socket, and
 *      OpenSSL retries the same record later.  BIO_flush never releases.
 *    - A connection freed without another write frees the held bytes
 *      unsent.  TLS 1.2 and client connections never capture.
 *    - tlsctl_stash_remove(), called from Python right after the first
 *      application write returns (between OpenSSL calls, never from inside
 *      a BIO or info callback), takes the filter out of the chain once it
 *      holds nothing: from then on records go straight to the transport.
 *
 * 8. Per-context state, ticket callbacks and shared ticket keys.
 *    - Each SSL_CTX we configure carries a tlsctl_ctx_ext in ex_data under
 *      OUR OWN index (Python's _ssl owns SSL ex_data index 0, the app data;
 *      we never read or write it).  The ex_data free function cleanses the
 *      keys and frees the struct when OpenSSL frees the SSL_CTX, so its
 *      lifetime is exactly the SSL_CTX's.
 *    - Python callbacks: the ext holds a strong reference to a WEAK
 *      reference to the Python-side holder of the user's callables, which
 *      lives as an attribute of the ssl.SSLContext.  So the callables (and
 *      whatever they capture) live exactly as long as the SSLContext, and a
 *      cycle through them stays visible to Python's garbage collector.
 *      OpenSSL calls us with the GIL released (_ssl releases it around
 *      SSL_do_handshake / SSL_read / SSL_write); every touch of a Python
 *      object takes it with PyGILState_Ensure, including from cffi-called
 *      functions (cffi releases the GIL around them too).
 *    - Each server connection made by a tlsctl factory on such a context
 *      carries its Python record (tlsctl's per-connection state, which knows
 *      the ssl.SSLSocket / ssl.SSLObject weakly) in SSL ex_data under our
 *      own index, with a strong reference released by the ex_data free
 *      function.  The single Python dispatcher is called with that record:
 *      it calls the user's callable, and keeps any exception in the record
 *      for the Python layer to re-raise after the OpenSSL call returns
 *      (pyOpenSSL's pattern); here we only see a decision or a failure.
 *      Python never unwinds through OpenSSL's stack frames.
 *    - Shared ticket keys: the ticket key callback (EVP_MAC form on 3.x,
 *      legacy HMAC_CTX form on 1.1.1) looks keys up in C, under a mutex (a
 *      rotation may run in another thread while handshakes run without the
 *      GIL): no Python call per handshake.  Key name 16 bytes; 80-byte keys
 *      are AES-256-CBC + HMAC-SHA256 with a 32-byte secret, nginx's 48-byte
 *      keys AES-128-CBC + HMAC-SHA256 with a 16-byte secret.  The first key
 *      encrypts; a ticket under any listed key decrypts; decrypting with a
 *      non-first key asks OpenSSL for a renewal (return 2), and on TLS 1.3
 *      so does the first, as OpenSSL's built-in keys do.  An unknown name
 *      returns 0: a full handshake.  Key copies on the stack and replaced or
 *      freed key arrays are wiped with OPENSSL_cleanse.  The callback finds
 *      the keys through SSL_get_SSL_CTX(s): a connection moved to another
 *      context by an SNI callback uses that context's keys.
 *
 * 9. The per-connection path in C, on contexts without ticket callbacks:
 *    "defer" on OpenSSL 3.x (the stash stays in Python), "suppress" and
 *    "immediate" everywhere, and issue_tickets() on such connections.  The
 *    Python version cost ~40 us per connection in a handshake loop (cold
 *    caches), 4% of a handshake.
 *    - tlsctl_fast_init(), once at binding, creates the FirstWriteProxy
 *      type (PyType_FromSpec, stable ABI) and the builtins arm, make_create
 *      and waiting, and hands them to Python in a dict (passed by id(), as
 *      every object in 3.; the caller keeps it alive).  These are ordinary
 *      Python-callable C functions: the GIL is held, unlike in the cffi
 *      functions above.
 *    - make_create() returns the _create of a factory class: it calls the
 *      user's class's _create, proves the new connection's SSL (2.), records
 *      the policy in the SSL's ex_data (a tagged integer, see
 *      TLSCTL_IS_COUNT: no allocation, nothing to free) and, for "defer" on
 *      a server connection, sets conn._sslobj to a FirstWriteProxy.
 *    - The proxy forwards every attribute to the real _ssl._SSLSocket
 *      except write (and _real).  Its write queues the tickets
 *      (tlsctl_queue_tickets), flushes them with the real do_handshake() on
 *      a socket (a memory BIO takes every byte, so SSL_write writes them
 *      ahead of the data itself), calls the real write, and puts the real
 *      object back on the owner (_ssl._SSLSocket.owner), so later writes are
 *      stock.  On an exception it stays, like the Python proxy, for the
 *      retry.  It holds no reference to the connection: no cycle.
 */
"""

CDEF_TYPES = """
typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct ssl_session_st SSL_SESSION;
typedef struct bio_st BIO;
typedef struct bio_method_st BIO_METHOD;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_md_st EVP_MD;
typedef struct evp_mac_ctx_st EVP_MAC_CTX;
typedef struct hmac_ctx_st HMAC_CTX;
typedef struct engine_st ENGINE;
typedef struct ossl_param_st {
    const char *key;
    unsigned int data_type;
    void *data;
    size_t data_size;
    size_t return_size;
} OSSL_PARAM;
typedef void (*tlsctl_void_fn)(void);
typedef int (*tlsctl_ex_dup_fn)(void *, const void *, void *, int, long, void *);
typedef void (*tlsctl_ex_free_fn)(void *, void *, void *, int, long, void *);
typedef int (*tlsctl_key_evp_fn)(SSL *, unsigned char *, unsigned char *,
                                 EVP_CIPHER_CTX *, EVP_MAC_CTX *, int);
typedef int (*tlsctl_gen_ticket_fn)(SSL *, void *);
typedef int (*tlsctl_client_hello_fn)(SSL *, int *, void *);
typedef void (*tlsctl_info_fn)(const SSL *, int, int);
typedef int (*tlsctl_bio_write_fn)(BIO *, const char *, int);
typedef int (*tlsctl_bio_read_fn)(BIO *, char *, int);
typedef long (*tlsctl_bio_ctrl_fn)(BIO *, int, long, void *);
typedef int (*tlsctl_bio_life_fn)(BIO *);
typedef int (*tlsctl_dec_ticket_fn)(SSL *, SSL_SESSION *,
                                    const unsigned char *, size_t,
                                    int, void *);
"""

CDEF_CONSTANTS = (
    "".join(
        f"static const int {name};\n"
        for name in {**OPENSSL_CONSTANTS, **OPENSSL3_CONSTANTS}
    )
    + """
static const int TLSCTL_KIND_UNKNOWN;
static const int TLSCTL_KIND_GENERIC;
static const int TLSCTL_KIND_SERVER;
static const int TLSCTL_KIND_CLIENT;
static const int TLSCTL_ERR_NOT_BOUND;
static const int TLSCTL_ERR_HANDSHAKE;
static const int TLSCTL_ERR_NO_NATIVE;
static const int TLSCTL_ERR_OPENSSL;
static const int TLSCTL_ERR_CLIENT;
static const int TLSCTL_ERR_NOT_TLS13;
static const int TLSCTL_RENEW_STOCK;
static const int TLSCTL_RENEW_NEVER;
static const int TLSCTL_ERR_NO_KEYS;
static const int TLSCTL_ERR_BAD_KEYS;
static const int TLSCTL_ERR_CLOSED;
static const int TLSCTL_MAX_TICKETS;
static const int TLSCTL_MAX_KEYS;
static const int TLSCTL_MAX_RESUME_CALLS;
static const int TLSCTL_EVENT_ISSUE;
static const int TLSCTL_EVENT_RESUME;
static const int TLSCTL_KEYS_NONE;
static const int TLSCTL_KEYS_LEGACY;
static const int TLSCTL_KEYS_EVP;
static const int TLSCTL_KEY_RECORD;
static const int TLSCTL_POLICY_NONE;
static const int TLSCTL_POLICY_DEFER;
static const int TLSCTL_POLICY_SUPPRESS;
static const int TLSCTL_POLICY_IMMEDIATE;
"""
)

CDEF_FUNCTIONS = "".join(
    f"{ret} {name}({params});\n" for name, ret, params, _ in OPENSSL_FUNCTIONS
)

CDEF_CUSTOMIZATIONS = """
int tlsctl_bind(const char *ssl_module_path, char *err, size_t errlen);
int tlsctl_is_bound(void);
const char *tlsctl_library_path(void);
int tlsctl_has_symbol(const char *name);
SSL_CTX *tlsctl_ctx_of(uintptr_t sslcontext_object);
SSL *tlsctl_ssl_of(uintptr_t sslsocket_object);
int tlsctl_ctx_method_kind(const SSL_CTX *ctx);
SSL *tlsctl_proven_ssl(uintptr_t sslsocket_object, uintptr_t sslcontext_object);
int tlsctl_set_renewal(SSL_CTX *ctx, int mode);
int tlsctl_queue_tickets(SSL *ssl, int n_full, int n_resumed);
int tlsctl_check_issue(SSL *ssl);
int tlsctl_stash_install(SSL *ssl);
int tlsctl_ctx_has_info_callback(SSL_CTX *ctx);
int tlsctl_stash_state(SSL *ssl, size_t *held, size_t *released_records);
int tlsctl_stash_remove(SSL *ssl);
int tlsctl_capture(SSL *ssl, int on);
int tlsctl_deferred_tickets(SSL *ssl, long count);
int tlsctl_quickack_install(SSL *ssl);
int tlsctl_set_dispatcher(uintptr_t dispatch_object);
int tlsctl_set_callbacks(SSL_CTX *ctx, uintptr_t holder_ref, int on_issue,
                         int on_resume);
int tlsctl_conn_register(SSL *ssl, uintptr_t record);
int tlsctl_keys_mode(void);
int tlsctl_set_ticket_keys(SSL_CTX *ctx, const unsigned char *records,
                           size_t nbytes);
size_t tlsctl_ticket_key_count(SSL_CTX *ctx);
int tlsctl_clear_ticket_keys(SSL_CTX *ctx);
int tlsctl_test_hold_keys(SSL_CTX *ctx, unsigned int milliseconds);
int tlsctl_test_keys_busy(SSL_CTX *ctx);
int tlsctl_guard_done(SSL *ssl);
int tlsctl_fast_init(uintptr_t namespace_dict, uintptr_t sslsocket_type,
                     uintptr_t raise_queue_error);
long tlsctl_conn_info(SSL *ssl);
"""

CDEF = CDEF_TYPES + CDEF_CONSTANTS + CDEF_FUNCTIONS + CDEF_CUSTOMIZATIONS


def _c_constants() -> str:
    return "".join(
        f"#define {name} {value}\n"
        for name, value in {**OPENSSL_CONSTANTS, **OPENSSL3_CONSTANTS}.items()
    )


def _c_function_pointers() -> str:
    """One ``static`` pointer per OpenSSL function, plus a guarded wrapper.

    The wrapper carries OpenSSL's own name (it is ``static``, so it never
    clashes with the library's exported symbol) and returns a neutral value
    instead of calling NULL.
    """
    out = []
    for name, ret, params, _ in OPENSSL_FUNCTIONS:
        out.append(f"static {ret} (*p_{name})({params}) = NULL;\n")
    for name, ret, params, _ in OPENSSL_FUNCTIONS:
        if params == "void":
            decl, args = "void", ""
        else:
            types = [p.strip() for p in params.split(",")]
            decl = ", ".join(f"{t} a{i}" for i, t in enumerate(types))
            args = ", ".join(f"a{i}" for i in range(len(types)))
        if ret == "void":
            body = f"if (p_{name} != NULL) p_{name}({args});"
        else:
            body = f"return p_{name} != NULL ? p_{name}({args}) : 0;"
        out.append(f"static {ret} {name}({decl}) {{ {body} }}\n")
    return "".join(out)


def _c_symbol_table() -> str:
    rows = "".join(
        f'    {{"{name}", (void **)&p_{name}, {int(required)}}},\n'
        for name, _, _, required in OPENSSL_FUNCTIONS
    )
    return (
        "static const struct tlsctl_sym {\n"
        "    const char *name; void **slot; int required;\n"
        "} tlsctl_syms[] = {\n" + rows + "    {NULL, NULL, 0}\n};\n"
    )


C_BODY = r"""
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <limits.h>
#include <time.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define TLSCTL_KIND_UNKNOWN 0
#define TLSCTL_KIND_GENERIC 1
#define TLSCTL_KIND_SERVER 2
#define TLSCTL_KIND_CLIENT 3

#define TLSCTL_ERR_NOT_BOUND (-1)
#define TLSCTL_ERR_HANDSHAKE (-2)
#define TLSCTL_ERR_NO_NATIVE (-3)
#define TLSCTL_ERR_OPENSSL (-4)
#define TLSCTL_ERR_CLIENT (-5)
#define TLSCTL_ERR_NOT_TLS13 (-6)
#define TLSCTL_ERR_CLOSED (-9)

/* At most this many tickets wait for one write (patch()'s count, plus
 * issue_tickets()): a client keeps a few (one per parallel connection it
 * may open); more only make the first write slow. */
#define TLSCTL_MAX_TICKETS 16

#define TLSCTL_RENEW_STOCK 0
#define TLSCTL_RENEW_NEVER 1

/* Mirrors of the leading fields of CPython's _ssl objects (see 3.). */
typedef struct { PyObject_HEAD SSL_CTX *ctx; } tlsctl_py_sslcontext;
typedef struct { PyObject_HEAD PyObject *Socket; SSL *ssl; } tlsctl_py_sslsocket;

static int tlsctl_bound = 0;
static char tlsctl_libpath[4096] = "";
static const SSL_METHOD *tlsctl_m_generic = NULL;
static const SSL_METHOD *tlsctl_m_server = NULL;
static const SSL_METHOD *tlsctl_m_client = NULL;

static int tlsctl_ext_init(void);  /* see 8. */
static void tlsctl_fork_prepare(void);
static void tlsctl_fork_release(void);

static int tlsctl_is_bound(void) { return tlsctl_bound; }
static const char *tlsctl_library_path(void) { return tlsctl_libpath; }

static int tlsctl_has_symbol(const char *name)
{
    const struct tlsctl_sym *s;
    for (s = tlsctl_syms; s->name != NULL; s++)
        if (strcmp(s->name, name) == 0)
            return *s->slot != NULL;
    return 0;
}

/* Resolve every symbol through the handle of _ssl's shared object (or the
 * global namespace when ssl_module_path is NULL).  All-or-nothing: on any
 * failure every pointer is reset and a reason is written to err. */
static int tlsctl_bind(const char *ssl_module_path, char *err, size_t errlen)
{
    void *handle;
    const struct tlsctl_sym *s;
    Dl_info dli;

    if (tlsctl_bound)
        return 0;
    if (ssl_module_path != NULL) {
        handle = dlopen(ssl_module_path, RTLD_NOW | RTLD_NOLOAD);
        if (handle == NULL) {
            const char *e = dlerror();
            snprintf(err, errlen, "dlopen(%s, RTLD_NOLOAD) failed: %s",
                     ssl_module_path, e ? e : "unknown error");
            return -1;
        }
    } else {
        handle = RTLD_DEFAULT;
    }
    for (s = tlsctl_syms; s->name != NULL; s++) {
        *s->slot = dlsym(handle, s->name);
        if (*s->slot == NULL && s->required) {
            const struct tlsctl_sym *t;
            snprintf(err, errlen,
                     "OpenSSL symbol %s is not reachable from %s "
                     "(hidden symbols, LibreSSL, or OpenSSL older than 1.1.1)",
                     s->name, ssl_module_path ? ssl_module_path
                                              : "the process's global symbols");
            for (t = tlsctl_syms; t->name != NULL; t++)
                *t->slot = NULL;
            if (handle != RTLD_DEFAULT)
                dlclose(handle);
            return -1;
        }
    }
    /* The handle stays open on purpose: _ssl is never unloaded anyway and
     * the pointers must outlive this call. */
    tlsctl_m_generic = p_TLS_method();
    tlsctl_m_server = p_TLS_server_method();
    tlsctl_m_client = p_TLS_client_method();
    if (dladdr((void *)p_TLS_server_method, &dli) != 0 && dli.dli_fname)
        snprintf(tlsctl_libpath, sizeof(tlsctl_libpath), "%s", dli.dli_fname);
    /* Our ex_data indexes, once, here (import time, under the import lock),
     * never lazily from two threads at once. */
    if (!tlsctl_ext_init()) {
        snprintf(err, errlen, "CRYPTO_get_ex_new_index failed");
        return -1;
    }
    if (pthread_atfork(tlsctl_fork_prepare, tlsctl_fork_release,
                       tlsctl_fork_release) != 0) {
        snprintf(err, errlen, "pthread_atfork failed");
        return -1;
    }
    tlsctl_bound = 1;
    return 0;
}

static SSL_CTX *tlsctl_ctx_of(uintptr_t obj)
{
    return ((tlsctl_py_sslcontext *)obj)->ctx;
}

static SSL *tlsctl_ssl_of(uintptr_t obj)
{
    return ((tlsctl_py_sslsocket *)obj)->ssl;
}

static int tlsctl_ctx_method_kind(const SSL_CTX *ctx)
{
    const SSL_METHOD *m;
    if (!tlsctl_bound || ctx == NULL)
        return TLSCTL_KIND_UNKNOWN;
    m = p_SSL_CTX_get_ssl_method(ctx);
    if (m == tlsctl_m_generic) return TLSCTL_KIND_GENERIC;
    if (m == tlsctl_m_server) return TLSCTL_KIND_SERVER;
    if (m == tlsctl_m_client) return TLSCTL_KIND_CLIENT;
    return TLSCTL_KIND_UNKNOWN;
}

/* The proof of 2. for a connection in one call: the SSL of an
 * _ssl._SSLSocket whose context's SSL_CTX comes from the bound library and
 * is the SSL's own SSL_CTX, else NULL (the caller finds out why). */
static SSL *tlsctl_proven_ssl(uintptr_t sslsocket_object, uintptr_t sslcontext_object)
{
    SSL_CTX *ctx = tlsctl_ctx_of(sslcontext_object);
    SSL *ssl;
    if (tlsctl_ctx_method_kind(ctx) == TLSCTL_KIND_UNKNOWN)
        return NULL;
    ssl = tlsctl_ssl_of(sslsocket_object);
    if (ssl == NULL || p_SSL_get_SSL_CTX(ssl) != ctx)
        return NULL;
    return ssl;
}


/* 0 when tickets may be issued on ssl now, else a TLSCTL_ERR_* code. */
static int tlsctl_check_issue(SSL *ssl)
{
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (!p_SSL_is_server(ssl))
        return TLSCTL_ERR_CLIENT;
    if (p_SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN)
        return TLSCTL_ERR_CLOSED;  /* unwrap(): nothing more is written */
    if (!p_SSL_is_init_finished(ssl))
        return TLSCTL_ERR_HANDSHAKE;
    if (p_SSL_version(ssl) != TLS1_3_VERSION)
        return TLSCTL_ERR_NOT_TLS13;
    if (p_SSL_new_session_ticket == NULL)
        return TLSCTL_ERR_NO_NATIVE;
    return 0;
}

/* Called immediately before an application write.  Returns the number of
 * tickets queued (0 when the connection is not a TLS 1.3 server, which is
 * final), or TLSCTL_ERR_HANDSHAKE when the handshake has not finished yet
 * (the caller completes it and asks again), or another TLSCTL_ERR_*. */
/* ---- the stash (see 7.) ------------------------------------------- */

typedef struct {
    int capturing;
    unsigned char *held;
    size_t held_len, held_off, held_cap;
    size_t released_records;
} tlsctl_stash;

static BIO_METHOD *tlsctl_stash_method = NULL;
static int tlsctl_stash_type = 0;

static void tlsctl_stash_drop(tlsctl_stash *st)
{
    free(st->held);
    st->held = NULL;
    st->held_len = st->held_off = st->held_cap = 0;
}

static int tlsctl_stash_create(BIO *b)
{
    tlsctl_stash *st = calloc(1, sizeof(*st));
    if (st == NULL)
        return 0;
    p_BIO_set_data(b, st);
    p_BIO_set_init(b, 1);
    return 1;
}

static int tlsctl_stash_destroy(BIO *b)
{
    tlsctl_stash *st = p_BIO_get_data(b);
    if (st != NULL) {
        tlsctl_stash_drop(st);
        free(st);
    }
    p_BIO_set_data(b, NULL);
    p_BIO_set_init(b, 0);
    return 1;
}

static size_t tlsctl_count_records(const unsigned char *p, size_t len)
{
    size_t n = 0, off = 0;
    while (off + 5 <= len) {
        off += 5 + (((size_t)p[off + 3] << 8) | p[off + 4]);
        n++;
    }
    return n;
}

static int tlsctl_stash_write(BIO *b, const char *data, int len)
{
    tlsctl_stash *st = p_BIO_get_data(b);
    BIO *next = p_BIO_next(b);
    int n;

    p_BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    if (st == NULL || next == NULL || len < 0)
        return -1;
    if (st->capturing) {
        if (st->held_len + (size_t)len > st->held_cap) {
            size_t cap = (st->held_len + (size_t)len) * 2;
            unsigned char *grown = realloc(st->held, cap);
            if (grown == NULL)
                return -1;
            st->held = grown;
            st->held_cap = cap;
        }
        memcpy(st->held + st->held_len, data, (size_t)len);
        st->held_len += (size_t)len;
        return len;
    }
    if (st->held_off < st->held_len && len > 0) {
        /* Release: the held records and this one in ONE write, so a peer
         * that is gone cannot reset the connection between them. */
        size_t rem = st->held_len - st->held_off;
        unsigned char *both;
        if (rem + (size_t)len > 0x7fffffff)
            return -1;
        if ((both = malloc(rem + (size_t)len)) == NULL)
            return -1;
        memcpy(both, st->held + st->held_off, rem);
        memcpy(both + rem, data, (size_t)len);
        n = p_BIO_write(next, both, (int)(rem + (size_t)len));
        free(both);
        p_BIO_copy_next_retry(b);
        if (n <= 0)
            return n;
        st->held_off += (size_t)n < rem ? (size_t)n : rem;
        if (st->held_off == st->held_len) {
            st->released_records += tlsctl_count_records(st->held, st->held_len);
            tlsctl_stash_drop(st);
        }
        if ((size_t)n <= rem) {  /* none of this record went out: retry it */
            p_BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
            p_BIO_set_flags(b, BIO_FLAGS_WRITE | BIO_FLAGS_SHOULD_RETRY);
            return -1;
        }
        return n - (int)rem;  /* this record: all or part, like any BIO */
    }
    n = p_BIO_write(next, data, len);
    p_BIO_copy_next_retry(b);
    return n;
}

static int tlsctl_stash_read(BIO *b, char *out, int len)
{
    BIO *next = p_BIO_next(b);
    int n;
    p_BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
    if (next == NULL)
        return 0;
    n = p_BIO_read(next, out, len);
    p_BIO_copy_next_retry(b);
    return n;
}

static long tlsctl_stash_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    BIO *next = p_BIO_next(b);
    long ret;
    if (next == NULL)
        return 0;
    ret = p_BIO_ctrl(next, cmd, num, ptr);
    p_BIO_copy_next_retry(b);
    return ret;
}

static tlsctl_stash *tlsctl_stash_of(const SSL *s)
{
    BIO *b = p_SSL_get_wbio(s);
    if (b == NULL || p_BIO_method_type(b) != tlsctl_stash_type)
        return NULL;
    return p_BIO_get_data(b);
}

/* TCP_QUICKACK on the socket of a TLS 1.3 server connection whose handshake
 * just read the client's Finished (see 10.): Linux then sends the pending
 * ACK of that Finished at once instead of delaying it ~40 ms.  Elsewhere,
 * and on memory BIOs (no descriptor in the chain), nothing happens. */
static void tlsctl_quickack(const SSL *s)
{
#ifdef TCP_QUICKACK
    int fd, one = 1;
    if (p_SSL_version(s) != TLS1_3_VERSION || (fd = p_SSL_get_rfd(s)) < 0)
        return;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
#else
    (void)s;
#endif
}

static void tlsctl_quickack_cb(const SSL *s, int where, int ret)
{
    (void)ret;
    if ((where & SSL_CB_HANDSHAKE_DONE) && p_SSL_is_server(s))
        tlsctl_quickack(s);
}

/* For a server connection on a socket whose handshake sends no ticket
 * (defer, suppress): TCP_QUICKACK now if its handshake already finished
 * (SSLSocket._create runs it), else make tlsctl_quickack_cb its info
 * callback.  1 when done or installed, 0 when not needed or when another
 * info callback is set (never shadowed). */
static int tlsctl_quickack_install(SSL *ssl)
{
    BIO *w;
    if (tlsctl_bound && p_SSL_is_init_finished(ssl)) {
        tlsctl_quickack(ssl);
        return 1;
    }
    if (!tlsctl_bound || p_SSL_get_info_callback(ssl) != NULL
            || p_SSL_CTX_get_info_callback(p_SSL_get_SSL_CTX(ssl)) != NULL
            || (w = p_SSL_get_wbio(ssl)) == NULL
            || p_BIO_method_type(w) == BIO_TYPE_MEM)
        return 0;
    p_SSL_set_info_callback(ssl, tlsctl_quickack_cb);
    return 1;
}

static void tlsctl_info_cb(const SSL *s, int where, int ret)
{
    tlsctl_stash *st;
    (void)ret;
    if (!p_SSL_is_server(s))
        return;
    if (where & SSL_CB_HANDSHAKE_DONE)
        tlsctl_quickack(s);  /* the stash holds the tickets back too */
    if (where == SSL_CB_ACCEPT_LOOP) {
        /* "TRFIN" is TLS_ST_SR_FINISHED, whose enum VALUE differs between
         * versions (32 in 1.1.1 and 3.0, 36 in 3.5); the string does not. */
        if (p_SSL_version(s) == TLS1_3_VERSION
                && strcmp(p_SSL_state_string(s), "TRFIN") == 0
                && (st = tlsctl_stash_of(s)) != NULL)
            st->capturing = 1;
    } else if (where == SSL_CB_ACCEPT_EXIT) {
        /* Not SSL_CB_HANDSHAKE_DONE: OpenSSL 3.x reports that at the
         * client's Finished, BEFORE writing the tickets (traced). */
        if (p_SSL_is_init_finished(s) && (st = tlsctl_stash_of(s)) != NULL)
            st->capturing = 0;
    }
}

static int tlsctl_stash_init(void)
{
    if (tlsctl_stash_method != NULL)
        return 1;
    tlsctl_stash_type = p_BIO_get_new_index() | BIO_TYPE_FILTER;
    tlsctl_stash_method = p_BIO_meth_new(tlsctl_stash_type, "tlsctl stash");
    if (tlsctl_stash_method == NULL)
        return 0;
    return p_BIO_meth_set_write(tlsctl_stash_method, tlsctl_stash_write)
        && p_BIO_meth_set_read(tlsctl_stash_method, tlsctl_stash_read)
        && p_BIO_meth_set_ctrl(tlsctl_stash_method, tlsctl_stash_ctrl)
        && p_BIO_meth_set_create(tlsctl_stash_method, tlsctl_stash_create)
        && p_BIO_meth_set_destroy(tlsctl_stash_method, tlsctl_stash_destroy);
}

/* Put a stash filter in front of ssl's write BIO; returns its state, or
 * NULL when OpenSSL failed. */
static tlsctl_stash *tlsctl_stash_push(SSL *ssl)
{
    BIO *w, *f;
    if (!tlsctl_stash_init() || (w = p_SSL_get_wbio(ssl)) == NULL
            || (f = p_BIO_new(tlsctl_stash_method)) == NULL)
        return NULL;
    /* SSL_set0_wbio frees the SSL's reference to w; the chain keeps ours. */
    p_BIO_up_ref(w);
    p_BIO_push(f, w);
    p_SSL_set0_wbio(ssl, f);
    return p_BIO_get_data(f);
}

/* Put the stash in front of a server SSL's write BIO and make
 * tlsctl_info_cb its info callback.  Call before its handshake starts.
 * Returns 1, 0 when it already has an info callback (ours or another's),
 * or TLSCTL_ERR_OPENSSL. */
static int tlsctl_stash_install(SSL *ssl)
{
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (p_SSL_get_info_callback(ssl) != NULL)
        return 0;
    if (tlsctl_stash_push(ssl) == NULL)
        return TLSCTL_ERR_OPENSSL;
    p_SSL_set_info_callback(ssl, tlsctl_info_cb);
    return 1;
}

/* One write for the tickets and the first data on a socket (see 10.):
 * on = 1 makes the connection's stash filter (pushed if absent) capture
 * what the caller's next OpenSSL call writes (the queued tickets, by the
 * handshake driver: captured writes always succeed, so a partial ticket
 * record can never be left behind); on = 0 stops capturing, and the next
 * record written (the data) goes out in one write() with the held
 * tickets in front of it.  Returns 1, 0 on a memory BIO (nothing to do:
 * it takes every byte, and SSL_write puts the tickets ahead of the data
 * in the same buffer), or TLSCTL_ERR_OPENSSL. */
static int tlsctl_capture(SSL *ssl, int on)
{
    tlsctl_stash *st;
    BIO *w;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if ((st = tlsctl_stash_of(ssl)) == NULL) {
        if (!on)
            return 1;
        if ((w = p_SSL_get_wbio(ssl)) == NULL || p_BIO_method_type(w) == BIO_TYPE_MEM)
            return 0;
        if ((st = tlsctl_stash_push(ssl)) == NULL)
            return TLSCTL_ERR_OPENSSL;
    }
    st->capturing = on;
    return 1;
}

/* A context-level info callback would be shadowed by the stash's
 * per-connection one; patch() refuses such contexts instead. */
static int tlsctl_ctx_has_info_callback(SSL_CTX *ctx)
{
    return tlsctl_bound && p_SSL_CTX_get_info_callback(ctx) != NULL;
}

/* 1 and the stash's state when ssl's write BIO is a stash, else 0. */
static int tlsctl_stash_state(SSL *ssl, size_t *held, size_t *released_records)
{
    tlsctl_stash *st;
    if (!tlsctl_bound || (st = tlsctl_stash_of(ssl)) == NULL)
        return 0;
    *held = st->held_len - st->held_off;
    *released_records = st->released_records;
    return 1;
}

/* Take the stash out of the write chain once it has nothing left to do
 * (handshake finished, not capturing, nothing held): later records go
 * straight to the transport, so the stash costs nothing per write after
 * the first.  Call only between OpenSSL calls (never from a callback).
 * Returns 1 when the stash is gone (or was never there), 0 when still
 * needed. */
static int tlsctl_stash_remove(SSL *ssl)
{
    BIO *f, *next;
    tlsctl_stash *st;
    if (!tlsctl_bound || (f = p_SSL_get_wbio(ssl)) == NULL
            || p_BIO_method_type(f) != tlsctl_stash_type)
        return 1;
    st = p_BIO_get_data(f);
    if (st == NULL || st->capturing || st->held_off < st->held_len
            || !p_SSL_is_init_finished(ssl) || (next = p_BIO_next(f)) == NULL)
        return 0;
    /* SSL_set0_wbio frees the chain f -> next: our new reference keeps
     * next alive as the SSL's own wbio. */
    p_BIO_up_ref(next);
    p_SSL_set0_wbio(ssl, next);
    if (p_SSL_get_info_callback(ssl) == tlsctl_info_cb)
        p_SSL_set_info_callback(ssl, NULL);
    return 1;
}

static int tlsctl_queue_tickets(SSL *ssl, int n_full, int n_resumed)
{
    int rc, n, i;
    rc = tlsctl_check_issue(ssl);
    if (rc == TLSCTL_ERR_CLIENT || rc == TLSCTL_ERR_NOT_TLS13
            || rc == TLSCTL_ERR_CLOSED)
        return 0;
    n = p_SSL_session_reused(ssl) ? n_resumed : n_full;
    if (rc == TLSCTL_ERR_NO_NATIVE && n == 0)
        return 0;
    if (rc != 0)
        return rc;
    for (i = 0; i < n; i++)
        if (p_SSL_new_session_ticket(ssl) != 1)
            return TLSCTL_ERR_OPENSSL;
    return n;
}

/* ---- per-context state, ticket callbacks, shared keys (see 8.) ------- */

#define TLSCTL_ERR_NO_KEYS (-7)
#define TLSCTL_ERR_BAD_KEYS (-8)
#define TLSCTL_EVENT_ISSUE 1
#define TLSCTL_EVENT_RESUME 2
#define TLSCTL_KEYS_NONE 0
#define TLSCTL_KEYS_LEGACY 1
#define TLSCTL_KEYS_EVP 2
#define TLSCTL_KEY_RECORD 81  /* size byte (48 or 80), name, hmac[32], aes[32] */
#define TLSCTL_KEY_NAME_LEN 16  /* TLSEXT_KEYNAME_LENGTH (ssl_local.h) */
#define TLSCTL_MAX_KEYS 65536
/* OpenSSL calls the decrypt callback once per PSK identity of a
 * ClientHello (thousands fit in one).  Python's on_resume runs at most
 * this often per connection; a ticket past that is not used (a full
 * handshake), so no identity resumes without on_resume's consent. */
#define TLSCTL_MAX_RESUME_CALLS 8

typedef struct {
    int size;  /* 48: AES-128 + 16-byte HMAC secret; 80: AES-256 + 32 */
    unsigned char name[TLSCTL_KEY_NAME_LEN];
    unsigned char hmac[32];
    unsigned char aes[32];
} tlsctl_key;

typedef struct {
    unsigned char name[TLSCTL_KEY_NAME_LEN];
    size_t index;                /* in tlsctl_ctx_ext.keys */
} tlsctl_key_ref;

typedef struct tlsctl_ctx_ext {
    pthread_mutex_t lock;        /* guards keys / by_name / nkeys */
    tlsctl_key *keys;            /* keys[0] encrypts */
    tlsctl_key_ref *by_name;     /* sorted by name: lookups in O(log n) */
    size_t nkeys;
    int renew;                   /* TLSCTL_RENEW_* */
    int on_issue, on_resume;     /* Python callables present (read w/o GIL) */
    PyObject *holder_ref;        /* weakref to the Python holder; GIL */
    struct tlsctl_ctx_ext *prev, *next;  /* every live ext (for fork) */
} tlsctl_ctx_ext;

/* The SSL ex_data slot holds either the Python record of a connection on
 * a context with ticket callbacks (a PyObject *, even address) or, for a
 * connection tracked in C (see 9.), a tagged integer, odd: bit 0 set, bits
 * 1-2 the policy (TLSCTL_POLICY_*), the rest the tickets issued so far. */
#define TLSCTL_IS_COUNT(p) ((((uintptr_t)(p)) & 1u) != 0)

static int tlsctl_ctx_idx = -1;
static int tlsctl_ssl_idx = -1;
/* SSL slots with no Python in them: the SSL_CTX (referenced) whose keys a
 * connection uses, and the number of on_resume calls it has made. */
static int tlsctl_keyctx_idx = -1;
static int tlsctl_calls_idx = -1;
static PyObject *tlsctl_dispatch = NULL;

/* Every live tlsctl_ctx_ext, so that fork() can take all their locks: a
 * child forked while another thread held one would otherwise inherit it
 * locked forever (its owner does not exist in the child).  The list lock
 * also serialises creating an ext.  Lock order: list, then an ext. */
static tlsctl_ctx_ext *tlsctl_exts = NULL;
static pthread_mutex_t tlsctl_exts_lock = PTHREAD_MUTEX_INITIALIZER;

static void tlsctl_fork_prepare(void)
{
    tlsctl_ctx_ext *e;
    pthread_mutex_lock(&tlsctl_exts_lock);
    for (e = tlsctl_exts; e != NULL; e = e->next)
        pthread_mutex_lock(&e->lock);
}

/* In the parent and in the child (whose one thread is the one that took
 * the locks in tlsctl_fork_prepare, so it may release them). */
static void tlsctl_fork_release(void)
{
    tlsctl_ctx_ext *e;
    for (e = tlsctl_exts; e != NULL; e = e->next)
        pthread_mutex_unlock(&e->lock);
    pthread_mutex_unlock(&tlsctl_exts_lock);
}

static void tlsctl_keys_free(tlsctl_key *keys, tlsctl_key_ref *by_name, size_t n)
{
    if (keys != NULL) {
        p_OPENSSL_cleanse(keys, n * sizeof(*keys));
        free(keys);
    }
    free(by_name);  /* names and positions only: nothing secret */
}

static void tlsctl_decref(PyObject *obj)
{
    PyGILState_STATE g;
    if (obj == NULL || !Py_IsInitialized())
        return;
    g = PyGILState_Ensure();
    Py_DecRef(obj);
    PyGILState_Release(g);
}

static void tlsctl_ctx_ext_free(void *parent, void *ptr, void *ad, int idx,
                                long argl, void *argp)
{
    tlsctl_ctx_ext *ext = ptr;
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (ext == NULL)
        return;
    pthread_mutex_lock(&tlsctl_exts_lock);
    if (ext->prev != NULL)
        ext->prev->next = ext->next;
    else
        tlsctl_exts = ext->next;
    if (ext->next != NULL)
        ext->next->prev = ext->prev;
    pthread_mutex_unlock(&tlsctl_exts_lock);
    tlsctl_keys_free(ext->keys, ext->by_name, ext->nkeys);
    tlsctl_decref(ext->holder_ref);
    pthread_mutex_destroy(&ext->lock);
    free(ext);
}

/* The key context slot holds a reference to an SSL_CTX. */
static void tlsctl_keyctx_free(void *parent, void *ptr, void *ad, int idx,
                               long argl, void *argp)
{
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (ptr != NULL)
        p_SSL_CTX_free(ptr);
}

static int tlsctl_keyctx_dup(void *to, const void *from, void *from_d,
                             int idx, long argl, void *argp)
{
    SSL_CTX *ctx = *(SSL_CTX **)from_d;
    (void)to; (void)from; (void)idx; (void)argl; (void)argp;
    if (ctx != NULL)
        p_SSL_CTX_up_ref(ctx);
    return 1;
}

static void tlsctl_ssl_rec_free(void *parent, void *ptr, void *ad, int idx,
                                long argl, void *argp)
{
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (!TLSCTL_IS_COUNT(ptr))
        tlsctl_decref(ptr);
}

/* SSL_dup copies ex_data pointers: give the copy its own reference.
 * (from_d points at the slot in 1.1.1 and 3.x alike.) */
static int tlsctl_ssl_rec_dup(void *to, const void *from, void *from_d,
                              int idx, long argl, void *argp)
{
    PyObject *obj = *(PyObject **)from_d;
    PyGILState_STATE g;
    (void)to; (void)from; (void)idx; (void)argl; (void)argp;
    if (obj != NULL && !TLSCTL_IS_COUNT(obj)) {
        g = PyGILState_Ensure();
        Py_IncRef(obj);
        PyGILState_Release(g);
    }
    return 1;
}

static int tlsctl_ext_init(void)
{
    /* Called once from tlsctl_bind; later calls only report the result. */
    if (tlsctl_ctx_idx < 0)
        tlsctl_ctx_idx = p_CRYPTO_get_ex_new_index(
            CRYPTO_EX_INDEX_SSL_CTX, 0, NULL, NULL, NULL, tlsctl_ctx_ext_free);
    if (tlsctl_ssl_idx < 0)
        tlsctl_ssl_idx = p_CRYPTO_get_ex_new_index(
            CRYPTO_EX_INDEX_SSL, 0, NULL, NULL, tlsctl_ssl_rec_dup,
            tlsctl_ssl_rec_free);
    if (tlsctl_keyctx_idx < 0)
        tlsctl_keyctx_idx = p_CRYPTO_get_ex_new_index(
            CRYPTO_EX_INDEX_SSL, 0, NULL, NULL, tlsctl_keyctx_dup,
            tlsctl_keyctx_free);
    if (tlsctl_calls_idx < 0)
        tlsctl_calls_idx = p_CRYPTO_get_ex_new_index(
            CRYPTO_EX_INDEX_SSL, 0, NULL, NULL, NULL, NULL);
    /* Index 0 of SSL is _ssl's app data; a fresh index is never 0 for SSL
     * (OpenSSL reserves 0 for app data), but refuse to share it anyway. */
    return tlsctl_ctx_idx > 0 && tlsctl_ssl_idx > 0 && tlsctl_keyctx_idx > 0
        && tlsctl_calls_idx > 0;
}

static tlsctl_ctx_ext *tlsctl_ext_of(const SSL_CTX *ctx)
{
    if (ctx == NULL || tlsctl_ctx_idx <= 0)
        return NULL;
    return p_SSL_CTX_get_ex_data(ctx, tlsctl_ctx_idx);
}

static tlsctl_ctx_ext *tlsctl_ext_get_or_create(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext;
    pthread_mutex_lock(&tlsctl_exts_lock);
    ext = tlsctl_ext_of(ctx);
    if (ext == NULL && tlsctl_ext_init()
            && (ext = calloc(1, sizeof(*ext))) != NULL) {
        pthread_mutex_init(&ext->lock, NULL);
        if (!p_SSL_CTX_set_ex_data(ctx, tlsctl_ctx_idx, ext)) {
            pthread_mutex_destroy(&ext->lock);
            free(ext);
            ext = NULL;
        } else {
            ext->next = tlsctl_exts;
            if (tlsctl_exts != NULL)
                tlsctl_exts->prev = ext;
            tlsctl_exts = ext;
        }
    }
    pthread_mutex_unlock(&tlsctl_exts_lock);
    return ext;
}

/* OpenSSL's own decision for a status when no callback is installed
 * (ssl/t1_lib.c, tls_decrypt_ticket and its callers). */
static int tlsctl_default_decision(int status)
{
    switch (status) {
    case SSL_TICKET_SUCCESS:
        return SSL_TICKET_RETURN_USE;
    case SSL_TICKET_SUCCESS_RENEW:
        return SSL_TICKET_RETURN_USE_RENEW;
    case SSL_TICKET_EMPTY:
    case SSL_TICKET_NO_DECRYPT:
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    case SSL_TICKET_NONE:
        return SSL_TICKET_RETURN_IGNORE;
    default:
        return SSL_TICKET_RETURN_ABORT;
    }
}

/* Position of a key name in ext's list, or -1 (binary search over
 * by_name, so a ClientHello full of unknown names costs O(log n) each
 * under the lock).  Caller holds ext->lock. */
static int tlsctl_key_find(const tlsctl_ctx_ext *ext, const unsigned char *name)
{
    size_t lo = 0, hi = ext->nkeys, mid;
    int c;
    while (lo < hi) {
        mid = lo + (hi - lo) / 2;
        c = memcmp(ext->by_name[mid].name, name, TLSCTL_KEY_NAME_LEN);
        if (c == 0)
            return (int)ext->by_name[mid].index;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

/* The ext whose keys a connection uses: that of the context its handshake
 * started on (recorded by tlsctl_client_hello_cb: OpenSSL runs the ticket
 * key callback of that context, its session_ctx, even after an SNI
 * callback moved the connection to another context), else the current
 * one.  The recorded context is referenced by the SSL, so it outlives
 * every call from OpenSSL on the connection. */
static tlsctl_ctx_ext *tlsctl_keys_ext_of(const SSL *s)
{
    SSL_CTX *ctx = tlsctl_keyctx_idx > 0 ? p_SSL_get_ex_data(s, tlsctl_keyctx_idx)
                                         : NULL;
    return tlsctl_ext_of(ctx != NULL ? ctx : p_SSL_get_SSL_CTX(s));
}

static int tlsctl_key_index(const SSL *s, const unsigned char *name, size_t len)
{
    tlsctl_ctx_ext *ext = tlsctl_keys_ext_of(s);
    int found;
    if (ext == NULL || name == NULL || len != TLSCTL_KEY_NAME_LEN)
        return -1;
    pthread_mutex_lock(&ext->lock);
    found = tlsctl_key_find(ext, name);
    pthread_mutex_unlock(&ext->lock);
    return found;
}

/* Installed on a context with shared keys: records the context the
 * handshake starts on (see tlsctl_keys_ext_of).  Runs before SNI and
 * before any ticket is decrypted. */
static int tlsctl_client_hello_cb(SSL *s, int *alert, void *arg)
{
    SSL_CTX *ctx = p_SSL_get_SSL_CTX(s), *old;
    (void)alert; (void)arg;
    old = p_SSL_get_ex_data(s, tlsctl_keyctx_idx);
    if (old != ctx && p_SSL_CTX_up_ref(ctx) == 1) {
        if (p_SSL_set_ex_data(s, tlsctl_keyctx_idx, ctx) == 1)
            p_SSL_CTX_free(old);  /* a second handshake (TLS 1.2) */
        else
            p_SSL_CTX_free(ctx);  /* not recorded: the current context */
    }
    return SSL_CLIENT_HELLO_SUCCESS;
}

/* tlsctl's Python record of a connection on a context with ticket
 * callbacks, or NULL: nothing there, or a C-tracked connection's tagged
 * integer (a connection made before set_ticket_callbacks(), which the
 * callbacks ignore). */
static PyObject *tlsctl_record_of(const SSL *s)
{
    void *v = tlsctl_ssl_idx > 0 ? p_SSL_get_ex_data(s, tlsctl_ssl_idx) : NULL;
    return v == NULL || TLSCTL_IS_COUNT(v) ? NULL : (PyObject *)v;
}

/* Call the Python dispatcher with rec (a record, see tlsctl_record_of);
 * returns a new reference or NULL (the error is reported as unraisable:
 * the dispatcher itself never raises). */
static PyObject *tlsctl_call_python(tlsctl_ctx_ext *ext, PyObject *rec,
                                    int event, int status, PyObject *appdata,
                                    PyObject *keyname, int key_index,
                                    int fallback)
{
    PyObject *res;
    if (tlsctl_dispatch == NULL || ext->holder_ref == NULL)
        return NULL;
    res = PyObject_CallFunction(tlsctl_dispatch, "iOOiOOii", event,
                                ext->holder_ref, rec, status,
                                appdata ? appdata : Py_None,
                                keyname ? keyname : Py_None, key_index,
                                fallback);
    if (res == NULL)
        PyErr_WriteUnraisable(tlsctl_dispatch);
    return res;
}

static int tlsctl_gen_ticket_cb(SSL *s, void *arg)
{
    tlsctl_ctx_ext *ext = arg;
    PyGILState_STATE g;
    PyObject *res, *rec;
    int ok = 1;
    if (ext == NULL || !ext->on_issue || (rec = tlsctl_record_of(s)) == NULL)
        return 1;
    g = PyGILState_Ensure();
    if (ext->holder_ref != NULL) {  /* not removed meanwhile */
        res = tlsctl_call_python(ext, rec, TLSCTL_EVENT_ISSUE, -1, NULL, NULL,
                                 -1, 1);
        ok = 0;  /* failure, or the dispatcher kept an exception */
        if (res == Py_None) {
            ok = 1;
        } else if (res != NULL && PyBytes_Check(res)) {
            char *data;
            Py_ssize_t len;
            SSL_SESSION *sess = p_SSL_get_session(s);
            if (sess != NULL && PyBytes_AsStringAndSize(res, &data, &len) == 0)
                ok = p_SSL_SESSION_set1_ticket_appdata(sess, data, (size_t)len);
            PyErr_Clear();
        }
        Py_XDECREF(res);
    }
    PyGILState_Release(g);
    return ok;
}

static int tlsctl_dec_ticket_cb(SSL *s, SSL_SESSION *ss,
                                const unsigned char *keyname, size_t keyname_len,
                                int status, void *arg)
{
    tlsctl_ctx_ext *ext = arg;
    int decision = tlsctl_default_decision(status);
    PyObject *rec;
    uintptr_t calls;
    if (ext == NULL)
        return decision;
    if (ext->on_resume && status != SSL_TICKET_NONE && status != SSL_TICKET_EMPTY
            && (rec = tlsctl_record_of(s)) != NULL) {
        PyGILState_STATE g;
        calls = (uintptr_t)p_SSL_get_ex_data(s, tlsctl_calls_idx);
        if (calls >= TLSCTL_MAX_RESUME_CALLS
                || !p_SSL_set_ex_data(s, tlsctl_calls_idx, (void *)(calls + 1)))
            return SSL_TICKET_RETURN_IGNORE_RENEW;  /* never resume unasked */
        g = PyGILState_Ensure();
        PyObject *appdata = NULL, *name = NULL, *res;
        void *data = NULL;
        size_t len = 0;
        if (ss != NULL && p_SSL_SESSION_get0_ticket_appdata(ss, &data, &len) == 1)
            appdata = PyBytes_FromStringAndSize(data ? data : "", (Py_ssize_t)len);
        if (keyname != NULL)
            name = PyBytes_FromStringAndSize((const char *)keyname,
                                             (Py_ssize_t)keyname_len);
        if (ext->holder_ref == NULL) {  /* removed meanwhile */
            res = PyLong_FromLong(decision);
        } else if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(NULL);
            res = NULL;
        } else {
            res = tlsctl_call_python(
                ext, rec, TLSCTL_EVENT_RESUME, status, appdata, name,
                tlsctl_key_index(s, keyname, keyname_len), decision);
        }
        if (res != NULL) {
            long v = PyLong_AsLong(res);
            if (v >= SSL_TICKET_RETURN_ABORT && v <= SSL_TICKET_RETURN_USE_RENEW)
                decision = (int)v;
            else
                decision = SSL_TICKET_RETURN_ABORT;
            PyErr_Clear();
        } else {
            decision = SSL_TICKET_RETURN_ABORT;
        }
        Py_XDECREF(res);
        Py_XDECREF(appdata);
        Py_XDECREF(name);
        PyGILState_Release(g);
    }
    if (ext->renew == TLSCTL_RENEW_NEVER && decision == SSL_TICKET_RETURN_USE_RENEW)
        decision = SSL_TICKET_RETURN_USE;
    return decision;
}

static int tlsctl_install_ticket_cb(SSL_CTX *ctx, tlsctl_ctx_ext *ext)
{
    int needed = ext->renew == TLSCTL_RENEW_NEVER || ext->on_issue || ext->on_resume;
    if (!needed)
        return p_SSL_CTX_set_session_ticket_cb(ctx, NULL, NULL, NULL);
    return p_SSL_CTX_set_session_ticket_cb(
        ctx, ext->on_issue ? tlsctl_gen_ticket_cb : NULL, tlsctl_dec_ticket_cb, ext);
}

static int tlsctl_set_renewal(SSL_CTX *ctx, int mode)
{
    tlsctl_ctx_ext *ext;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if ((ext = tlsctl_ext_get_or_create(ctx)) == NULL)
        return TLSCTL_ERR_OPENSSL;
    ext->renew = mode;
    return tlsctl_install_ticket_cb(ctx, ext);
}

/* The Python function every callback goes through; kept for the life of
 * the process. */
static int tlsctl_set_dispatcher(uintptr_t obj)
{
    PyGILState_STATE g = PyGILState_Ensure();
    Py_IncRef((PyObject *)obj);
    Py_XDECREF(tlsctl_dispatch);
    tlsctl_dispatch = (PyObject *)obj;
    PyGILState_Release(g);
    return 1;
}

/* holder_ref: id() of a weakref to the Python holder, or 0 to remove. */
static int tlsctl_set_callbacks(SSL_CTX *ctx, uintptr_t holder_ref,
                                int on_issue, int on_resume)
{
    tlsctl_ctx_ext *ext;
    PyGILState_STATE g;
    PyObject *old;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if ((ext = tlsctl_ext_get_or_create(ctx)) == NULL)
        return TLSCTL_ERR_OPENSSL;
    g = PyGILState_Ensure();
    old = ext->holder_ref;
    if (holder_ref != 0)
        Py_IncRef((PyObject *)holder_ref);
    ext->holder_ref = holder_ref != 0 ? (PyObject *)holder_ref : NULL;
    ext->on_issue = holder_ref != 0 && on_issue;
    ext->on_resume = holder_ref != 0 && on_resume;
    Py_XDECREF(old);
    PyGILState_Release(g);
    return tlsctl_install_ticket_cb(ctx, ext);
}

/* Attach tlsctl's per-connection record (strong reference) to ssl. */
static int tlsctl_conn_register(SSL *ssl, uintptr_t record)
{
    PyGILState_STATE g;
    PyObject *old;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (!tlsctl_ext_init())
        return TLSCTL_ERR_OPENSSL;
    g = PyGILState_Ensure();
    old = p_SSL_get_ex_data(ssl, tlsctl_ssl_idx);
    Py_IncRef((PyObject *)record);
    if (!p_SSL_set_ex_data(ssl, tlsctl_ssl_idx, (void *)record)) {
        Py_DecRef((PyObject *)record);
        PyGILState_Release(g);
        return TLSCTL_ERR_OPENSSL;
    }
    Py_XDECREF(old);
    PyGILState_Release(g);
    return 1;
}

/* 1 once nothing can call back into Python on ssl any more: a finished
 * TLS 1.3 handshake (TLS 1.2 may renegotiate). */
static int tlsctl_guard_done(SSL *ssl)
{
    return tlsctl_bound && p_SSL_is_init_finished(ssl)
        && p_SSL_version(ssl) == TLS1_3_VERSION;
}

static int tlsctl_keys_mode(void)
{
    if (!tlsctl_bound)
        return TLSCTL_KEYS_NONE;
    if (p_SSL_CTX_set_tlsext_ticket_key_evp_cb != NULL
            && p_EVP_MAC_CTX_set_params != NULL)
        return TLSCTL_KEYS_EVP;
    if (p_HMAC_Init_ex != NULL)
        return TLSCTL_KEYS_LEGACY;
    return TLSCTL_KEYS_NONE;
}

/* The key of connections whose key context has no shared keys (moved to
 * another context before their handshake started): random, made once per
 * process, so such tickets resume within the process, like OpenSSL's own
 * keys.  Never "no ticket": OpenSSL 1.1.1 then sends a malformed TLS 1.3
 * NewSessionTicket (a zero-length ticket; the client fails with
 * LENGTH_MISMATCH, measured on 1.1.1w).  Guarded by tlsctl_exts_lock. */
static tlsctl_key tlsctl_fallback_key;
static int tlsctl_fallback_ready = 0;

static int tlsctl_fallback_pick(const unsigned char *name, int enc,
                                tlsctl_key *out)
{
    int rc = -1;
    pthread_mutex_lock(&tlsctl_exts_lock);
    if (!tlsctl_fallback_ready
            && p_RAND_bytes(tlsctl_fallback_key.name, TLSCTL_KEY_NAME_LEN) == 1
            && p_RAND_bytes(tlsctl_fallback_key.hmac, 32) == 1
            && p_RAND_bytes(tlsctl_fallback_key.aes, 32) == 1) {
        tlsctl_fallback_key.size = 80;
        tlsctl_fallback_ready = 1;
    }
    if (tlsctl_fallback_ready) {
        rc = 0;
        if (enc || memcmp(name, tlsctl_fallback_key.name, TLSCTL_KEY_NAME_LEN) == 0) {
            memcpy(out, &tlsctl_fallback_key, sizeof(*out));
            rc = 1;
        }
    }
    pthread_mutex_unlock(&tlsctl_exts_lock);
    return rc;
}

/* Copy the key for this operation out from under the lock.  Returns 1,
 * 0 (decrypt: unknown key name, a full handshake) or -1. */
static int tlsctl_key_pick(SSL *s, const unsigned char *name, int enc,
                           tlsctl_key *out, size_t *index)
{
    tlsctl_ctx_ext *ext = tlsctl_keys_ext_of(s);
    int rc = 0, i = -1, keys = 0;
    if (ext != NULL) {
        pthread_mutex_lock(&ext->lock);
        keys = ext->nkeys > 0;
        i = enc ? (keys ? 0 : -1) : tlsctl_key_find(ext, name);
        if (i >= 0) {
            memcpy(out, &ext->keys[i], sizeof(*out));
            *index = (size_t)i;
            rc = 1;
        }
        pthread_mutex_unlock(&ext->lock);
    }
    if (!keys) {
        *index = 0;
        rc = tlsctl_fallback_pick(name, enc, out);
    }
    return rc;
}

static int tlsctl_key_cb(SSL *s, unsigned char *name, unsigned char *iv,
                         EVP_CIPHER_CTX *cctx, void *hctx, int enc, int evp)
{
    tlsctl_key k;
    size_t index = 0;
    int rc, hlen;
    const EVP_CIPHER *cipher;

    rc = tlsctl_key_pick(s, name, enc, &k, &index);
    if (rc <= 0)
        return rc;
    cipher = k.size == 48 ? p_EVP_aes_128_cbc() : p_EVP_aes_256_cbc();
    hlen = k.size == 48 ? 16 : 32;
    if (enc) {
        memcpy(name, k.name, TLSCTL_KEY_NAME_LEN);
        if (p_RAND_bytes(iv, 16) != 1
                || p_EVP_EncryptInit_ex(cctx, cipher, NULL, k.aes, iv) != 1)
            rc = -1;
    } else if (p_EVP_DecryptInit_ex(cctx, cipher, NULL, k.aes, iv) != 1) {
        rc = -1;
    }
    if (rc == 1) {
        if (evp) {
            OSSL_PARAM params[3];
            memset(params, 0, sizeof(params));
            params[0].key = "digest";
            params[0].data_type = OSSL_PARAM_UTF8_STRING;
            params[0].data = (void *)"SHA256";
            params[0].data_size = 6;
            params[0].return_size = (size_t)-1;  /* OSSL_PARAM_UNMODIFIED */
            params[1].key = "key";
            params[1].data_type = OSSL_PARAM_OCTET_STRING;
            params[1].data = k.hmac;
            params[1].data_size = (size_t)hlen;
            params[1].return_size = (size_t)-1;
            if (p_EVP_MAC_CTX_set_params((EVP_MAC_CTX *)hctx, params) != 1)
                rc = -1;
        } else if (p_HMAC_Init_ex((HMAC_CTX *)hctx, k.hmac, hlen, p_EVP_sha256(),
                                  NULL) != 1) {
            rc = -1;
        }
    }
    if (rc == 1 && !enc && (index != 0 || p_SSL_version(s) == TLS1_3_VERSION))
        rc = 2;  /* renew: under the first key; TLS 1.3 as built-in keys do */
    p_OPENSSL_cleanse(&k, sizeof(k));
    return rc;
}

static int tlsctl_key_evp_cb(SSL *s, unsigned char *name, unsigned char *iv,
                             EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc)
{
    return tlsctl_key_cb(s, name, iv, cctx, hctx, enc, 1);
}

static int tlsctl_key_legacy_cb(SSL *s, unsigned char *name, unsigned char *iv,
                                EVP_CIPHER_CTX *cctx, HMAC_CTX *hctx, int enc)
{
    return tlsctl_key_cb(s, name, iv, cctx, hctx, enc, 0);
}

static int tlsctl_key_ref_cmp(const void *a, const void *b)
{
    return memcmp(((const tlsctl_key_ref *)a)->name,
                  ((const tlsctl_key_ref *)b)->name, TLSCTL_KEY_NAME_LEN);
}

/* records: nbytes / TLSCTL_KEY_RECORD keys (size byte 48 or 80, name,
 * hmac[32], aes[32], unused bytes zero).  Everything is checked here, not
 * trusted from Python: the length, each size byte, at most TLSCTL_MAX_KEYS
 * keys, no name twice (TLSCTL_ERR_BAD_KEYS).  Replaces the key list; the
 * old one is wiped. */
static int tlsctl_set_ticket_keys(SSL_CTX *ctx, const unsigned char *records,
                                  size_t nbytes)
{
    tlsctl_ctx_ext *ext;
    tlsctl_key *keys, *old;
    tlsctl_key_ref *by_name, *old_by_name;
    size_t i, n, old_n;
    int mode = tlsctl_keys_mode();
    long ok;

    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (mode == TLSCTL_KEYS_NONE)
        return TLSCTL_ERR_NO_KEYS;
    n = nbytes / TLSCTL_KEY_RECORD;
    if (records == NULL || n == 0 || n > TLSCTL_MAX_KEYS
            || nbytes % TLSCTL_KEY_RECORD != 0)
        return TLSCTL_ERR_BAD_KEYS;
    for (i = 0; i < n; i++)
        if (records[i * TLSCTL_KEY_RECORD] != 48
                && records[i * TLSCTL_KEY_RECORD] != 80)
            return TLSCTL_ERR_BAD_KEYS;
    if ((ext = tlsctl_ext_get_or_create(ctx)) == NULL)
        return TLSCTL_ERR_OPENSSL;
    keys = calloc(n, sizeof(*keys));
    by_name = calloc(n, sizeof(*by_name));
    if (keys == NULL || by_name == NULL) {
        free(keys);
        free(by_name);
        return TLSCTL_ERR_OPENSSL;
    }
    for (i = 0; i < n; i++) {
        const unsigned char *r = records + i * TLSCTL_KEY_RECORD;
        keys[i].size = r[0];
        memcpy(keys[i].name, r + 1, TLSCTL_KEY_NAME_LEN);
        memcpy(keys[i].hmac, r + 1 + TLSCTL_KEY_NAME_LEN, 32);
        memcpy(keys[i].aes, r + 1 + TLSCTL_KEY_NAME_LEN + 32, 32);
        memcpy(by_name[i].name, keys[i].name, TLSCTL_KEY_NAME_LEN);
        by_name[i].index = i;
    }
    qsort(by_name, n, sizeof(*by_name), tlsctl_key_ref_cmp);
    for (i = 1; i < n; i++) {
        if (tlsctl_key_ref_cmp(&by_name[i - 1], &by_name[i]) == 0) {
            tlsctl_keys_free(keys, by_name, n);
            return TLSCTL_ERR_BAD_KEYS;
        }
    }
    pthread_mutex_lock(&ext->lock);
    old = ext->keys;
    old_by_name = ext->by_name;
    old_n = ext->nkeys;
    ext->keys = keys;
    ext->by_name = by_name;
    ext->nkeys = n;
    pthread_mutex_unlock(&ext->lock);
    tlsctl_keys_free(old, old_by_name, old_n);
    p_SSL_CTX_set_client_hello_cb(ctx, tlsctl_client_hello_cb, NULL);
    if (mode == TLSCTL_KEYS_EVP)
        ok = p_SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, tlsctl_key_evp_cb);
    else
        ok = p_SSL_CTX_callback_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB,
                                     (tlsctl_void_fn)tlsctl_key_legacy_cb);
    return ok == 1 ? 1 : TLSCTL_ERR_OPENSSL;
}

static size_t tlsctl_ticket_key_count(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    size_t n;
    if (ext == NULL)
        return 0;
    pthread_mutex_lock(&ext->lock);
    n = ext->nkeys;
    pthread_mutex_unlock(&ext->lock);
    return n;
}

/* Undo tlsctl_set_ticket_keys: OpenSSL's own keys again (injection's
 * extract_from_ssl); the keys are wiped.  1, or TLSCTL_ERR_OPENSSL. */
static int tlsctl_clear_ticket_keys(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    tlsctl_key *old;
    tlsctl_key_ref *old_by_name;
    size_t old_n;
    long ok;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (ext == NULL || ext->nkeys == 0)
        return 1;
    if (tlsctl_keys_mode() == TLSCTL_KEYS_EVP)
        ok = p_SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, NULL);
    else
        ok = p_SSL_CTX_callback_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB, NULL);
    p_SSL_CTX_set_client_hello_cb(ctx, NULL, NULL);
    pthread_mutex_lock(&ext->lock);
    old = ext->keys;
    old_by_name = ext->by_name;
    old_n = ext->nkeys;
    ext->keys = NULL;
    ext->by_name = NULL;
    ext->nkeys = 0;
    pthread_mutex_unlock(&ext->lock);
    tlsctl_keys_free(old, old_by_name, old_n);
    return ok == 1 ? 1 : TLSCTL_ERR_OPENSSL;
}

/* For the fork regression test only: hold ctx's key lock for a while (cffi
 * calls this without the GIL), and tell whether another thread holds it. */
static int tlsctl_test_hold_keys(SSL_CTX *ctx, unsigned int milliseconds)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    struct timespec t;
    if (ext == NULL)
        return 0;
    t.tv_sec = milliseconds / 1000;
    t.tv_nsec = (long)(milliseconds % 1000) * 1000000L;
    pthread_mutex_lock(&ext->lock);
    nanosleep(&t, NULL);
    pthread_mutex_unlock(&ext->lock);
    return 1;
}

static int tlsctl_test_keys_busy(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    if (ext == NULL)
        return 0;
    if (pthread_mutex_trylock(&ext->lock) != 0)
        return 1;
    pthread_mutex_unlock(&ext->lock);
    return 0;
}
/* ---- the first-write proxy in C (see 9.) -------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *real;          /* the connection's _ssl._SSLSocket */
    SSL *ssl;                /* its SSL, proven when the proxy was made */
    int queue;               /* tickets are still to be queued */
    int n_full, n_resumed;   /* how many: after a full / resumed handshake */
    int flushing;            /* queued tickets not yet fully written */
    int memory;              /* the SSL writes to a memory BIO (SSLObject) */
    PyObject *do_handshake;  /* real.do_handshake, made on first lookup */
} tlsctl_fw;

static PyTypeObject *tlsctl_fw_type = NULL;
static PyObject *tlsctl_sslsocket_type = NULL;
static PyObject *tlsctl_raise_queue_error = NULL;
static PyObject *tlsctl_s_write = NULL, *tlsctl_s_do_handshake = NULL,
    *tlsctl_s_owner = NULL, *tlsctl_s_sslobj = NULL, *tlsctl_s_real = NULL,
    *tlsctl_s_context = NULL;
static Py_hash_t tlsctl_h_write = -1, tlsctl_h_real = -1;

#define TLSCTL_POLICY_NONE 0
#define TLSCTL_POLICY_DEFER 1
#define TLSCTL_POLICY_SUPPRESS 2
#define TLSCTL_POLICY_IMMEDIATE 3

/* A C-tracked connection's state as issued * 4 + policy, or -1 when ssl
 * is not tracked in C (nothing there, or a Python record). */
static long tlsctl_conn_info(SSL *ssl)
{
    void *v;
    if (!tlsctl_bound || tlsctl_ssl_idx <= 0)
        return -1;
    v = p_SSL_get_ex_data(ssl, tlsctl_ssl_idx);
    if (v == NULL || !TLSCTL_IS_COUNT(v))
        return -1;
    return (long)((uintptr_t)v >> 1);
}

/* Track ssl in C with this policy (if nothing else is there yet); then
 * count n more issued tickets.  0 when the slot holds a Python record. */
static int tlsctl_conn_track(SSL *ssl, int policy, int n)
{
    long info = tlsctl_conn_info(ssl);
    if (info < 0) {
        if (p_SSL_get_ex_data(ssl, tlsctl_ssl_idx) != NULL)
            return 0;
        info = policy;
    }
    info += 4L * n;
    return p_SSL_set_ex_data(ssl, tlsctl_ssl_idx,
                             (void *)(((uintptr_t)info << 1) | 1u)) == 1;
}

#define TLSCTL_NAME_OTHER 0         /* forwarded to the real object */
#define TLSCTL_NAME_WRITE 1         /* the proxy's own write */
#define TLSCTL_NAME_REAL 2          /* the real object itself */
#define TLSCTL_NAME_DO_HANDSHAKE 3  /* forwarded, bound method cached */

/* Names in code are interned, so the pointer tests decide almost every
 * lookup (each handshake step looks up do_handshake); a hash test, not a
 * string compare per lookup, keeps other spellings of the proxy's own
 * names right (getattr() with a computed string). */
static int tlsctl_name_kind(PyObject *name)
{
    Py_hash_t h;
    if (name == tlsctl_s_do_handshake)
        return TLSCTL_NAME_DO_HANDSHAKE;
    if (name == tlsctl_s_write)
        return TLSCTL_NAME_WRITE;
    if (name == tlsctl_s_real)
        return TLSCTL_NAME_REAL;
    if (!PyUnicode_Check(name) || (h = PyObject_Hash(name)) == -1) {
        PyErr_Clear();
        return TLSCTL_NAME_OTHER;
    }
    if (h == tlsctl_h_write && PyUnicode_Compare(name, tlsctl_s_write) == 0)
        return TLSCTL_NAME_WRITE;
    if (h == tlsctl_h_real && PyUnicode_Compare(name, tlsctl_s_real) == 0)
        return TLSCTL_NAME_REAL;
    return TLSCTL_NAME_OTHER;
}

/* The handshake finished with another version than TLS 1.3: the proxy
 * has nothing to hold (tickets are TLS 1.3's post-handshake messages). */
static int tlsctl_fw_not_tls13(tlsctl_fw *fw)
{
    return !fw->flushing && p_SSL_is_init_finished(fw->ssl)
        && p_SSL_version(fw->ssl) != TLS1_3_VERSION;
}

static int tlsctl_fw_disarm(tlsctl_fw *fw);

static PyObject *tlsctl_fw_getattro(PyObject *self, PyObject *name)
{
    tlsctl_fw *fw = (tlsctl_fw *)self;
    int kind = tlsctl_name_kind(name);
    if (kind != TLSCTL_NAME_REAL && tlsctl_fw_not_tls13(fw)) {
        /* A TLS 1.2 connection: put the real object back at the first
         * look after the handshake, so the connection costs what stock
         * costs from then on. */
        if (tlsctl_fw_disarm(fw) < 0)
            return NULL;
        fw->queue = 0;
        Py_CLEAR(fw->do_handshake);
        return PyObject_GetAttr(fw->real, name);
    }
    switch (kind) {
    case TLSCTL_NAME_WRITE:
        return PyObject_GenericGetAttr(self, name);
    case TLSCTL_NAME_REAL:
        Py_INCREF(fw->real);
        return fw->real;
    case TLSCTL_NAME_DO_HANDSHAKE:
        /* While the handshake runs, make the bound method of the real
         * object once instead of once per step; drop it afterwards so an
         * idle connection does not carry it. */
        if (p_SSL_is_init_finished(fw->ssl))
            break;
        if (fw->do_handshake == NULL
                && (fw->do_handshake = PyObject_GetAttr(fw->real, name)) == NULL)
            return NULL;
        Py_INCREF(fw->do_handshake);
        return fw->do_handshake;
    default:
        break;
    }
    Py_CLEAR(fw->do_handshake);
    return PyObject_GetAttr(fw->real, name);
}

static int tlsctl_fw_setattro(PyObject *self, PyObject *name, PyObject *value)
{
    return PyObject_SetAttr(((tlsctl_fw *)self)->real, name, value);
}

static void tlsctl_fw_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(((tlsctl_fw *)self)->do_handshake);
    Py_XDECREF(((tlsctl_fw *)self)->real);
    PyObject_Free(self);
    Py_DECREF(tp);
}

/* Put the real object back on the connection (if the proxy is still
 * there: close() / unwrap() may have replaced it). */
static int tlsctl_fw_disarm(tlsctl_fw *fw)
{
    PyObject *owner, *current;
    int rc = 0;
    owner = PyObject_GetAttr(fw->real, tlsctl_s_owner);
    if (owner == NULL)
        return -1;
    if (owner != Py_None) {
        current = PyObject_GetAttr(owner, tlsctl_s_sslobj);
        if (current == NULL)
            rc = -1;
        else if (current == (PyObject *)fw)
            rc = PyObject_SetAttr(owner, tlsctl_s_sslobj, fw->real);
        Py_XDECREF(current);
    }
    Py_DECREF(owner);
    return rc;
}

static int tlsctl_fw_call(PyObject *obj, PyObject *method, PyObject *arg,
                          PyObject **result)
{
    PyObject *r = PyObject_CallMethodObjArgs(obj, method, arg, NULL);
    if (r == NULL)
        return -1;
    if (result != NULL)
        *result = r;
    else
        Py_DECREF(r);
    return 0;
}

/* Raise tlsctl's OpenSSLError with OpenSSL's error queue (through the
 * Python function tlsctl_fast_init was given); returns NULL. */
static PyObject *tlsctl_raise_openssl(void)
{
    PyObject *r = PyObject_CallObject(tlsctl_raise_queue_error, NULL);
    if (r != NULL) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_RuntimeError, "queueing tickets failed");
    }
    return NULL;
}

static PyObject *tlsctl_fw_write(PyObject *self, PyObject *data)
{
    tlsctl_fw *fw = (tlsctl_fw *)self;
    PyObject *result = NULL;
    int rc;
    if (fw->queue) {
        rc = tlsctl_queue_tickets(fw->ssl, fw->n_full, fw->n_resumed);
        if (rc == TLSCTL_ERR_HANDSHAKE) {
            /* The write would run the handshake itself: run it first (it
             * raises SSLWantReadError etc. as the write would; the proxy
             * stays for the retry), then queue. */
            if (tlsctl_fw_call(fw->real, tlsctl_s_do_handshake, NULL, NULL) < 0)
                return NULL;
            rc = tlsctl_queue_tickets(fw->ssl, fw->n_full, fw->n_resumed);
        }
        if (rc < 0) {
            if (tlsctl_fw_disarm(fw) < 0)
                return NULL;
            return tlsctl_raise_openssl();
        }
        fw->queue = 0;
        fw->n_full = fw->n_resumed = 0;
        if (rc > 0) {
            tlsctl_conn_track(fw->ssl, TLSCTL_POLICY_NONE, rc);
            /* A memory BIO takes every byte, so SSL_write itself writes
             * the tickets (the state machine runs first) and then the
             * data; a socket may take part of a ticket record. */
            fw->flushing = !fw->memory;
        }
    }
    if (fw->flushing) {
        /* The handshake driver writes the queued tickets into the stash
         * filter (captured, so it cannot stop half-way); the data record
         * then takes them along in one write() (see 10. and _policy). */
        if (tlsctl_capture(fw->ssl, 1) < 0)
            return tlsctl_raise_openssl();
        rc = tlsctl_fw_call(fw->real, tlsctl_s_do_handshake, NULL, NULL);
        tlsctl_capture(fw->ssl, 0);
        if (rc < 0)
            return NULL;
        fw->flushing = 0;
    }
    if (tlsctl_fw_call(fw->real, tlsctl_s_write, data, &result) < 0)
        return NULL;
    tlsctl_stash_remove(fw->ssl);  /* sent: the filter has nothing to do */
    if (tlsctl_fw_disarm(fw) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* Only tlsctl_fw_install makes proxies: one made from Python would have no
 * real object to forward to. */
static PyObject *tlsctl_fw_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    (void)tp; (void)args; (void)kw;
    PyErr_SetString(PyExc_TypeError,
                    "FirstWriteProxy objects are made by tlsctl only");
    return NULL;
}

static PyMethodDef tlsctl_fw_methods[] = {
    {"write", tlsctl_fw_write, METH_O,
     "Queue and write the connection's tickets, then the data."},
    {NULL, NULL, 0, NULL}
};

static PyType_Slot tlsctl_fw_slots[] = {
    {Py_tp_new, (void *)tlsctl_fw_new},
    {Py_tp_dealloc, (void *)tlsctl_fw_dealloc},
    {Py_tp_getattro, (void *)tlsctl_fw_getattro},
    {Py_tp_setattro, (void *)tlsctl_fw_setattro},
    {Py_tp_methods, (void *)tlsctl_fw_methods},
    {Py_tp_doc, (void *)"tlsctl's stand-in for a connection's _sslobj until "
                        "its first write (see tlsctl._policy)."},
    {0, NULL}
};

static PyType_Spec tlsctl_fw_spec = {
    "tlsctl._binding.FirstWriteProxy", sizeof(tlsctl_fw), 0,
    Py_TPFLAGS_DEFAULT, tlsctl_fw_slots
};

/* n more tickets for the next write; refused (ValueError) past
 * TLSCTL_MAX_TICKETS waiting, with the connection left as it was. */
static int tlsctl_add_count(tlsctl_fw *fw, int n)
{
    if (n < 1 || fw->n_full > TLSCTL_MAX_TICKETS - n) {
        PyErr_Format(PyExc_ValueError,
                     "at most %d tickets can wait for one write; %d already "
                     "do, %d more asked for",
                     TLSCTL_MAX_TICKETS, fw->n_full, n);
        return -1;
    }
    fw->n_full += n;
    fw->n_resumed += n;
    return 0;
}

/* The SSL of real if real is an _ssl._SSLSocket whose SSL is proven to
 * belong to the bound library (see 2.), else NULL (no exception set). */
static SSL *tlsctl_real_ssl(PyObject *real)
{
    PyObject *ctx;
    SSL *ssl;
    if ((PyObject *)Py_TYPE(real) != tlsctl_sslsocket_type)
        return NULL;
    /* _ssl._SSLSocket.context is always a real _ssl._SSLContext. */
    if ((ctx = PyObject_GetAttr(real, tlsctl_s_context)) == NULL) {
        PyErr_Clear();
        return NULL;
    }
    ssl = tlsctl_proven_ssl((uintptr_t)real, (uintptr_t)ctx);
    Py_DECREF(ctx);
    return ssl;
}

/* Put a new proxy for (real, ssl) in front of conn._sslobj. */
static int tlsctl_fw_install(PyObject *conn, PyObject *real, SSL *ssl,
                             int n_full, int n_resumed)
{
    tlsctl_fw *fw = (tlsctl_fw *)PyType_GenericAlloc(tlsctl_fw_type, 0);
    int rc;
    if (fw == NULL)
        return -1;
    Py_INCREF(real);
    fw->real = real;
    fw->ssl = ssl;
    fw->queue = 1;
    fw->n_full = n_full;
    fw->n_resumed = n_resumed;
    fw->flushing = 0;
    fw->do_handshake = NULL;
    fw->memory = p_BIO_method_type(p_SSL_get_wbio(ssl)) == BIO_TYPE_MEM;
    rc = PyObject_SetAttr(conn, tlsctl_s_sslobj, (PyObject *)fw);
    Py_DECREF(fw);
    return rc;
}

/* arm(conn, n) -> bool, for issue_tickets(): n more tickets with the next
 * write, through the proxy already in front of conn._sslobj or a new one.
 * False when conn._sslobj is not a proven _ssl._SSLSocket or ssl carries
 * a Python record (the caller handles those). */
static PyObject *tlsctl_fast_arm(PyObject *unused, PyObject *args)
{
    PyObject *conn, *current, *result = Py_False;
    tlsctl_fw *fw;
    SSL *ssl;
    int n;
    (void)unused;
    if (!PyArg_ParseTuple(args, "Oi:arm", &conn, &n))
        return NULL;
    if ((current = PyObject_GetAttr(conn, tlsctl_s_sslobj)) == NULL)
        return NULL;
    if (Py_TYPE(current) == tlsctl_fw_type) {
        fw = (tlsctl_fw *)current;
        if (tlsctl_add_count(fw, n) < 0) {
            Py_DECREF(current);
            return NULL;
        }
        fw->queue = 1;
        result = Py_True;
    } else if ((ssl = tlsctl_real_ssl(current)) != NULL && n >= 1
               && n <= TLSCTL_MAX_TICKETS
               && tlsctl_conn_track(ssl, TLSCTL_POLICY_NONE, 0)) {
        if (tlsctl_fw_install(conn, current, ssl, n, n) < 0) {
            Py_DECREF(current);
            return NULL;
        }
        result = Py_True;
    }
    Py_DECREF(current);
    Py_INCREF(result);
    return result;
}

/* The tickets a defer connection sends after a full handshake: count, or
 * (count < 0) its context's num_tickets now, so a later
 * `ctx.num_tickets = n` applies to new connections; at most
 * TLSCTL_MAX_TICKETS. */
static int tlsctl_deferred_count(SSL *ssl, long count)
{
    size_t n = count >= 0 ? (size_t)count
                          : p_SSL_CTX_get_num_tickets(p_SSL_get_SSL_CTX(ssl));
    return n > TLSCTL_MAX_TICKETS ? TLSCTL_MAX_TICKETS : (int)n;
}

/* apply(conn): tlsctl's policy for a server connection that
 * SSLContext.wrap_socket / wrap_bio just made on a patched context without
 * ticket callbacks (see 9. and _policy).  self is the tuple (policy,
 * count, renew, fallback) given to make_apply; count < 0 follows the
 * context's num_tickets.  The connection is tracked in C; for defer and
 * suppress its own num_tickets becomes 0 (its handshake sends none; the
 * context's value, the user's knob, is left alone) and it gets
 * TCP_QUICKACK (see 10.); for immediate with a count, its num_tickets is
 * that count; for defer, a first-write proxy.  fallback(conn) handles a
 * connection whose SSL cannot be proven here (it raises the reason).
 * Called before the handshake starts. */
static PyObject *tlsctl_fast_apply(PyObject *self, PyObject *conn)
{
    PyObject *real, *r;
    SSL *ssl;
    long policy, count;
    int renew, n, rc = 0;
    if ((real = PyObject_GetAttr(conn, tlsctl_s_sslobj)) == NULL)
        return NULL;
    policy = PyLong_AsLong(PyTuple_GetItem(self, 0));
    count = PyLong_AsLong(PyTuple_GetItem(self, 1));
    renew = PyObject_IsTrue(PyTuple_GetItem(self, 2));
    if (real == Py_None) {
        rc = 0;  /* not connected: no SSL yet */
    } else if ((ssl = tlsctl_real_ssl(real)) != NULL && !p_SSL_is_server(ssl)) {
        rc = 0;  /* the client role is left exactly as stock */
    } else if (ssl == NULL || !tlsctl_conn_track(ssl, (int)policy, 0)) {
        r = PyObject_CallFunctionObjArgs(PyTuple_GetItem(self, 3), conn, NULL);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    } else if (policy == TLSCTL_POLICY_IMMEDIATE) {
        if (count >= 0)
            p_SSL_set_num_tickets(ssl, (size_t)count);
    } else {
        p_SSL_set_num_tickets(ssl, 0);
        tlsctl_quickack_install(ssl);
        if (policy == TLSCTL_POLICY_DEFER) {
            n = tlsctl_deferred_count(ssl, count);
            rc = tlsctl_fw_install(conn, real, ssl, n, renew && n > 0 ? 1 : 0);
        }
    }
    Py_DECREF(real);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef tlsctl_fast_apply_def = {
    "apply", tlsctl_fast_apply, METH_O,
    "Apply tlsctl's policy to a server connection just made (in C)."
};

/* make_apply(policy, count, renew, fallback): the function the wrap_socket
 * / wrap_bio hooks call with each new connection of a context. */
static PyObject *tlsctl_fast_make_apply(PyObject *unused, PyObject *args)
{
    PyObject *fallback;
    int policy, count, renew;
    (void)unused;
    if (!PyArg_ParseTuple(args, "iipO:make_apply", &policy, &count, &renew,
                          &fallback))
        return NULL;
    if (policy < TLSCTL_POLICY_DEFER || policy > TLSCTL_POLICY_IMMEDIATE
            || count < -1 || count > TLSCTL_MAX_TICKETS) {
        PyErr_SetString(PyExc_ValueError, "make_apply: bad policy or count");
        return NULL;
    }
    return PyCFunction_NewEx(&tlsctl_fast_apply_def, args, NULL);
}

/* The count of the tickets a defer connection on a Python path (ticket
 * callbacks, the stash) sends: see tlsctl_deferred_count. */
static int tlsctl_deferred_tickets(SSL *ssl, long count)
{
    return tlsctl_deferred_count(ssl, count);
}

/* waiting(sslobj) -> bool: a proxy with tickets still to queue or write
 * (never a TLS 1.2 connection: no ticket is ever held for it). */
static PyObject *tlsctl_fast_waiting(PyObject *unused, PyObject *sslobj)
{
    tlsctl_fw *fw = (tlsctl_fw *)sslobj;
    (void)unused;
    if (Py_TYPE(sslobj) == tlsctl_fw_type && (fw->queue || fw->flushing)
            && !tlsctl_fw_not_tls13(fw))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyMethodDef tlsctl_fast_functions[] = {
    {"arm", tlsctl_fast_arm, METH_VARARGS, "arm(conn, n) -> bool"},
    {"make_apply", tlsctl_fast_make_apply, METH_VARARGS,
     "make_apply(policy, count, renew, fallback)"},
    {"waiting", tlsctl_fast_waiting, METH_O, "waiting(sslobj) -> bool"},
    {NULL, NULL, 0, NULL}
};

static PyObject *tlsctl_intern(const char *s, int *ok)
{
    PyObject *u = PyUnicode_InternFromString(s);
    if (u == NULL)
        *ok = 0;
    return u;
}

/* Called once at import: put FirstWriteProxy, arm and waiting into the
 * dict at namespace_dict (id() of a dict the caller keeps alive). */
static int tlsctl_fast_init(uintptr_t namespace_dict, uintptr_t sslsocket_type,
                            uintptr_t raise_queue_error)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *ns = (PyObject *)namespace_dict, *f;
    PyMethodDef *def;
    int ok = 1;
    if (tlsctl_fw_type == NULL) {
        tlsctl_s_write = tlsctl_intern("write", &ok);
        tlsctl_s_do_handshake = tlsctl_intern("do_handshake", &ok);
        tlsctl_s_owner = tlsctl_intern("owner", &ok);
        tlsctl_s_sslobj = tlsctl_intern("_sslobj", &ok);
        tlsctl_s_real = tlsctl_intern("_real", &ok);
        tlsctl_s_context = tlsctl_intern("context", &ok);
        if (ok) {
            tlsctl_h_write = PyObject_Hash(tlsctl_s_write);
            tlsctl_h_real = PyObject_Hash(tlsctl_s_real);
            tlsctl_fw_type = (PyTypeObject *)PyType_FromSpec(&tlsctl_fw_spec);
        }
        if (tlsctl_fw_type == NULL)
            ok = 0;
    }
    if (ok) {
        Py_IncRef((PyObject *)sslsocket_type);
        Py_XDECREF(tlsctl_sslsocket_type);
        tlsctl_sslsocket_type = (PyObject *)sslsocket_type;
        Py_IncRef((PyObject *)raise_queue_error);
        Py_XDECREF(tlsctl_raise_queue_error);
        tlsctl_raise_queue_error = (PyObject *)raise_queue_error;
        ok = PyDict_SetItemString(ns, "FirstWriteProxy",
                                  (PyObject *)tlsctl_fw_type) == 0;
    }
    for (def = tlsctl_fast_functions; ok && def->ml_name != NULL; def++) {
        f = PyCFunction_NewEx(def, NULL, NULL);
        ok = f != NULL && PyDict_SetItemString(ns, def->ml_name, f) == 0;
        Py_XDECREF(f);
    }
    if (!ok)
        PyErr_Clear();
    PyGILState_Release(g);
    return ok;
}
"""


def c_source() -> str:
    """The complete C source handed to ``set_source``."""
    return (
        C_HEADER_COMMENT
        + CDEF_TYPES
        + _c_constants()
        + _c_function_pointers()
        + _c_symbol_table()
        + C_BODY
    )


def _libraries() -> list[str]:
    # glibc < 2.34 keeps dlopen/dlsym/dladdr in libdl and pthread_mutex_* in
    # libpthread; musl and newer glibc accept both as empty stubs.  macOS
    # has them in libSystem.
    return ["dl", "pthread"] if sys.platform.startswith("linux") else []


def _limited_api() -> bool:
    # Free-threaded builds have no stable ABI before 3.15.
    return not sysconfig.get_config_var("Py_GIL_DISABLED")


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "_binding",
    c_source(),
    libraries=_libraries(),
    py_limited_api=_limited_api(),
)

if __name__ == "__main__":  # pragma: no cover - manual build aid
    ffibuilder.compile(verbose=True)
