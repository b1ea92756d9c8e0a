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
    "BIO_FLAGS_WRITE": 0x02,
    "BIO_FLAGS_RWS": 0x07,
    "BIO_FLAGS_SHOULD_RETRY": 0x08,
    "SSL_CB_ACCEPT_LOOP": 0x2001,
    "SSL_CB_ACCEPT_EXIT": 0x2002,
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
    # OpenSSL >= 3.0.0 only.
    ("SSL_new_session_ticket", "int", "SSL *", False),
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
 *    renew_on_resume=False.  It maps OpenSSL's status to the same decision
 *    OpenSSL makes without a callback, except that a successfully decrypted
 *    ticket resumes WITHOUT a renewal ticket.
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
 */
"""

CDEF_TYPES = """
typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct ssl_session_st SSL_SESSION;
typedef struct bio_st BIO;
typedef struct bio_method_st BIO_METHOD;
typedef int (*tlsctl_gen_ticket_fn)(SSL *, void *);
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
    "".join(f"static const int {name};\n" for name in OPENSSL_CONSTANTS)
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
int tlsctl_set_renewal(SSL_CTX *ctx, int mode);
int tlsctl_queue_tickets(SSL *ssl, int n_full, int n_resumed);
int tlsctl_check_issue(SSL *ssl);
int tlsctl_stash_install(SSL *ssl);
int tlsctl_ctx_has_info_callback(SSL_CTX *ctx);
int tlsctl_stash_state(SSL *ssl, size_t *held, size_t *released_records);
int tlsctl_stash_remove(SSL *ssl);
"""

CDEF = CDEF_TYPES + CDEF_CONSTANTS + CDEF_FUNCTIONS + CDEF_CUSTOMIZATIONS


def _c_constants() -> str:
    return "".join(
        f"#define {name} {value}\n" for name, value in OPENSSL_CONSTANTS.items()
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

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

/* Same decisions as OpenSSL without a callback (ssl/t1_lib.c,
 * tls_decrypt_ticket), except that a decrypted ticket is never renewed. */
static int tlsctl_dec_ticket_cb(SSL *s, SSL_SESSION *ss,
                                const unsigned char *keyname, size_t keyname_len,
                                int status, void *arg)
{
    (void)s; (void)ss; (void)keyname; (void)keyname_len; (void)arg;
    switch (status) {
    case SSL_TICKET_SUCCESS:
    case SSL_TICKET_SUCCESS_RENEW:
        return SSL_TICKET_RETURN_USE;
    case SSL_TICKET_EMPTY:
    case SSL_TICKET_NO_DECRYPT:
        return SSL_TICKET_RETURN_IGNORE_RENEW;
    default:
        return SSL_TICKET_RETURN_IGNORE;
    }
}

static int tlsctl_set_renewal(SSL_CTX *ctx, int mode)
{
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (mode == TLSCTL_RENEW_NEVER)
        return p_SSL_CTX_set_session_ticket_cb(ctx, NULL, tlsctl_dec_ticket_cb, NULL);
    return p_SSL_CTX_set_session_ticket_cb(ctx, NULL, NULL, NULL);
}

/* 0 when tickets may be issued on ssl now, else a TLSCTL_ERR_* code. */
static int tlsctl_check_issue(SSL *ssl)
{
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (!p_SSL_is_server(ssl))
        return TLSCTL_ERR_CLIENT;
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

static void tlsctl_info_cb(const SSL *cs, int where, int ret)
{
    SSL *s = (SSL *)cs;
    tlsctl_stash *st;
    (void)ret;
    if (!p_SSL_is_server(s))
        return;
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

/* Put the stash in front of a server SSL's write BIO and make
 * tlsctl_info_cb its info callback.  Call before its handshake starts.
 * Returns 1, 0 when it already has an info callback (ours or another's),
 * or TLSCTL_ERR_OPENSSL. */
static int tlsctl_stash_install(SSL *ssl)
{
    BIO *w, *f;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (p_SSL_get_info_callback(ssl) != NULL)
        return 0;
    if (!tlsctl_stash_init() || (w = p_SSL_get_wbio(ssl)) == NULL
            || (f = p_BIO_new(tlsctl_stash_method)) == NULL)
        return TLSCTL_ERR_OPENSSL;
    /* SSL_set0_wbio frees the SSL's reference to w; the chain keeps ours. */
    p_BIO_up_ref(w);
    p_BIO_push(f, w);
    p_SSL_set0_wbio(ssl, f);
    p_SSL_set_info_callback(ssl, tlsctl_info_cb);
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
    p_SSL_set_info_callback(ssl, NULL);
    return 1;
}

static int tlsctl_queue_tickets(SSL *ssl, int n_full, int n_resumed)
{
    int rc, n, i;
    rc = tlsctl_check_issue(ssl);
    if (rc == TLSCTL_ERR_CLIENT || rc == TLSCTL_ERR_NOT_TLS13)
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
    # glibc < 2.34 keeps dlopen/dlsym/dladdr in libdl; musl and newer glibc
    # accept -ldl as an empty stub.  macOS has them in libSystem.
    return ["dl"] if sys.platform.startswith("linux") else []


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
