/* bind.c: binding to the interpreter's OpenSSL, the instance proof,
 * object layouts, ticket queueing (sections 1 to 6 of tlsctl.h). */

static int tlsctl_bound = 0;
static char tlsctl_libpath[4096] = "";
static const SSL_METHOD *tlsctl_m_generic = NULL;
static const SSL_METHOD *tlsctl_m_server = NULL;
static const SSL_METHOD *tlsctl_m_client = NULL;

static int tlsctl_ext_init(void); /* see 8. */
static void tlsctl_fork_prepare(void);
static void tlsctl_fork_release(void);

static const char *tlsctl_library_path(void)
{
    return tlsctl_libpath;
}

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
                     s->name,
                     ssl_module_path ? ssl_module_path
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
    if (m == tlsctl_m_generic)
        return TLSCTL_KIND_GENERIC;
    if (m == tlsctl_m_server)
        return TLSCTL_KIND_SERVER;
    if (m == tlsctl_m_client)
        return TLSCTL_KIND_CLIENT;
    return TLSCTL_KIND_UNKNOWN;
}

/* The proof of 2. for a connection in one call: the SSL of an
 * _ssl._SSLSocket whose context's SSL_CTX comes from the bound library and
 * is the SSL's own SSL_CTX, else NULL (the caller finds out why). */
static SSL *tlsctl_proven_ssl(uintptr_t sslsocket_object,
                              uintptr_t sslcontext_object)
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
        return TLSCTL_ERR_CLOSED; /* unwrap(): nothing more is written */
    if (!p_SSL_is_init_finished(ssl))
        return TLSCTL_ERR_HANDSHAKE;
    if (p_SSL_version(ssl) != TLS1_3_VERSION)
        return TLSCTL_ERR_NOT_TLS13;
    if (p_SSL_new_session_ticket == NULL)
        return TLSCTL_ERR_NO_NATIVE;
    return 0;
}

/* The tickets a first write (or one after issue_tickets) sends now: n_full
 * or n_resumed by the handshake (none where stock would send none, see
 * tlsctl_ticket_expected), plus extra (issue_tickets); 0 when the
 * connection is not a finished TLS 1.3 server connection still writing. */
static int tlsctl_pending_tickets(SSL *ssl, int n_full, int n_resumed,
                                  int extra)
{
    int n, rc = tlsctl_check_issue(ssl);
    if (rc != 0 && rc != TLSCTL_ERR_NO_NATIVE)
        return 0;
    n = p_SSL_session_reused(ssl) ? n_resumed : n_full;
    return (tlsctl_ticket_expected(ssl) ? n : 0) + extra;
}

/* Called immediately before an application write.  Returns the number of
 * tickets queued (0 when the connection is not a TLS 1.3 server, which is
 * final), or TLSCTL_ERR_HANDSHAKE when the handshake has not finished yet
 * (the caller completes it and asks again), or another TLSCTL_ERR_*. */
static int tlsctl_queue_tickets(SSL *ssl, int n_full, int n_resumed, int extra)
{
    int rc, n, i;
    rc = tlsctl_check_issue(ssl);
    if (rc == TLSCTL_ERR_CLIENT || rc == TLSCTL_ERR_NOT_TLS13 ||
        rc == TLSCTL_ERR_CLOSED)
        return 0;
    if (rc == TLSCTL_ERR_HANDSHAKE)
        return rc;
    n = tlsctl_pending_tickets(ssl, n_full, n_resumed, extra);
    if (rc == TLSCTL_ERR_NO_NATIVE && n == 0)
        return 0;
    if (rc != 0)
        return rc;
    for (i = 0; i < n; i++)
        if (p_SSL_new_session_ticket(ssl) != 1)
            return TLSCTL_ERR_OPENSSL;
    return n;
}
