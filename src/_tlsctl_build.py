"""cffi (API mode) builder for ``tlsctl._binding``.

Importing this file has no side effects beyond creating ``ffibuilder``;
setuptools finds it through ``cffi_modules`` in ``setup.py``.  The C source
is assembled from the grouped strings below (types, constants, functions,
customizations), the way pyca/cryptography groups its ``_cffi_src``.

The module is built WITHOUT OpenSSL headers and WITHOUT linking libssl or
libcrypto.  The hand-written C lives in ``src/_tlsctl_c/`` (``tlsctl.h``
says why each piece exists); this file keeps what is generated from one
table: cdefs, constants, function pointers, guarded wrappers, the dlsym
table.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from cffi import FFI

# --------------------------------------------------------------------------
# Constants we declare ourselves instead of including <openssl/*.h>.
# tests/test_build.py compares each with the real headers when they are
# installed.  Keys are the OpenSSL macro names.
# --------------------------------------------------------------------------
OPENSSL_CONSTANTS: dict[str, int] = {
    "TLS1_3_VERSION": 0x0304,
    "CRYPTO_EX_INDEX_SSL": 0,
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
    "SSL_SENT_SHUTDOWN": 1,
    "SSL_CLIENT_HELLO_SUCCESS": 1,
}

# OpenSSL 3.x only (<openssl/core.h>, <openssl/bio.h>); checked when 3.x
# headers are installed.
OPENSSL3_CONSTANTS: dict[str, int] = {
    "OSSL_PARAM_UTF8_STRING": 4,
    "OSSL_PARAM_OCTET_STRING": 5,
    "BIO_CTRL_GET_KTLS_SEND": 73,
}

# Functions resolved at run time: (name, C return type, C parameters,
# required).  A required symbol that is missing makes binding fail with a
# reason; an optional one becomes a capability flag (``tlsctl_has_<name>``).
OPENSSL_FUNCTIONS: list[tuple[str, str, str, bool]] = [
    ("OpenSSL_version_num", "unsigned long", "void", True),
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
    # Ticket lifetime (set_ticket_lifetime).
    ("SSL_CTX_set_timeout", "long", "SSL_CTX *, long", True),
    ("SSL_CTX_get_timeout", "long", "const SSL_CTX *", True),
    ("SSL_CTX_get_num_tickets", "size_t", "const SSL_CTX *", True),
    ("SSL_set_num_tickets", "int", "SSL *, size_t", True),
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
    # HMAC-SHA256 for the derived keys of rotate_ticket_keys (HKDF): the
    # one-shot EVP_Q_mac on 3.x, the legacy HMAC() on 1.1.1.
    (
        "HMAC",
        "unsigned char *",
        "const EVP_MD *, const void *, int, const unsigned char *, size_t, "
        "unsigned char *, unsigned int *",
        False,
    ),
    (
        "EVP_Q_mac",
        "unsigned char *",
        "OSSL_LIB_CTX *, const char *, const char *, const char *, "
        "const OSSL_PARAM *, const void *, size_t, const unsigned char *, "
        "size_t, unsigned char *, size_t, size_t *",
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
typedef struct ossl_lib_ctx_st OSSL_LIB_CTX;
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
static const int TLSCTL_MAX_KEEP;
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
static const int TLSCTL_STATE_STOCK;
static const int TLSCTL_STATE_DUE;
static const int TLSCTL_STATE_FLUSHING;
static const int TLSCTL_STATE_GUARDED;
"""
)

CDEF_FUNCTIONS = "".join(
    f"{ret} {name}({params});\n" for name, ret, params, _ in OPENSSL_FUNCTIONS
)

CDEF_CUSTOMIZATIONS = """
int tlsctl_bind(const char *ssl_module_path, char *err, size_t errlen);
const char *tlsctl_library_path(void);
int tlsctl_has_symbol(const char *name);
SSL_CTX *tlsctl_ctx_of(uintptr_t sslcontext_object);
SSL *tlsctl_ssl_of(uintptr_t sslsocket_object);
int tlsctl_ctx_method_kind(const SSL_CTX *ctx);
SSL *tlsctl_proven_ssl(uintptr_t sslsocket_object, uintptr_t sslcontext_object);
int tlsctl_set_renewal(SSL_CTX *ctx, int mode);
int tlsctl_queue_tickets(SSL *ssl, int n_full, int n_resumed, int extra);
int tlsctl_check_issue(SSL *ssl);
int tlsctl_ctx_has_info_callback(SSL_CTX *ctx);
int tlsctl_stash_state(SSL *ssl, size_t *held, size_t *released_records);
int tlsctl_set_dispatcher(uintptr_t dispatch_object);
int tlsctl_set_callbacks(SSL_CTX *ctx, uintptr_t holder_ref, int on_issue,
                         int on_resume);
int tlsctl_keys_mode(void);
int tlsctl_set_ticket_keys(SSL_CTX *ctx, const unsigned char *records,
                           size_t nbytes);
size_t tlsctl_ticket_key_count(SSL_CTX *ctx);
int tlsctl_clear_ticket_keys(SSL_CTX *ctx);
int tlsctl_set_rotation(SSL_CTX *ctx, const unsigned char *master,
                        size_t master_len, unsigned long long every,
                        unsigned int keep);
long long tlsctl_rotation_window(SSL_CTX *ctx);
int tlsctl_set_lifetime(SSL_CTX *ctx, long seconds);
int tlsctl_test_hold_keys(SSL_CTX *ctx, unsigned int milliseconds);
int tlsctl_test_keys_busy(SSL_CTX *ctx);
int tlsctl_fast_init(uintptr_t namespace_dict, uintptr_t sslsocket_type,
                     uintptr_t raise_error);
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


# The hand-written C: real files, one per concern (see the layout note at
# the end of tlsctl.h's comment), spliced in this order into one
# translation unit after the generated parts, each behind a #line marker so
# compiler diagnostics, gdb, gcov and the sanitizers name the real file.
C_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tlsctl_c")
C_FILES = (
    "tlsctl.h",
    "bind.c",
    "stash.c",
    "tickets.c",
    "keys.c",
    "proxy.c",
    "apply.c",
)


def _c_files() -> str:
    out = []
    for name in C_FILES:
        path = os.path.join(C_DIR, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        shown = os.path.relpath(path).replace(os.sep, "/").replace('"', "")
        out.append(f'#line 1 "{shown}"\n{text}')
    # cffi's own glue follows: say so, rather than leave it on apply.c
    out.append('#line 1 "cffi-generated glue of tlsctl._binding"\n')
    return "".join(out)


def c_source() -> str:
    """The complete C source handed to ``set_source``."""
    return (
        CDEF_TYPES
        + _c_constants()
        + _c_function_pointers()
        + _c_symbol_table()
        + _c_files()
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
