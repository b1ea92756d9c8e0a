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
 */
"""

CDEF_TYPES = """
typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;
typedef struct ssl_session_st SSL_SESSION;
typedef int (*tlsctl_gen_ticket_fn)(SSL *, void *);
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
