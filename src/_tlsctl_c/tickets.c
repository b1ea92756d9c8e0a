/* tickets.c: per-context state, its ex_data and fork safety, the ticket
 * callbacks (8.).  The shared keys that use that state: keys.c. */

/* ---- per-context state and ticket callbacks (see 8.) -------------- */

#define TLSCTL_ERR_NO_KEYS  (-7)
#define TLSCTL_ERR_BAD_KEYS (-8)
#define TLSCTL_EVENT_ISSUE  1
#define TLSCTL_EVENT_RESUME 2
#define TLSCTL_KEYS_NONE    0
#define TLSCTL_KEYS_LEGACY  1
#define TLSCTL_KEYS_EVP     2
/* A key record: size byte (48 or 80), name, hmac[32], aes[32]. */
#define TLSCTL_KEY_RECORD   81
#define TLSCTL_KEY_NAME_LEN 16 /* TLSEXT_KEYNAME_LENGTH (ssl_local.h) */
#define TLSCTL_MAX_KEYS     65536
#define TLSCTL_MASTER_MAX   80 /* a TicketKey's bytes, or 80 random ones */
#define TLSCTL_MAX_KEEP     64 /* previous rotation windows kept */
/* OpenSSL calls the decrypt callback once per PSK identity of a
 * ClientHello (thousands fit in one).  Python's on_resume runs at most
 * this often per connection; a ticket past that is not used (a full
 * handshake), so no identity resumes without on_resume's consent. */
#define TLSCTL_MAX_RESUME_CALLS 8

typedef struct {
    int size; /* 48: AES-128 + 16-byte HMAC secret; 80: AES-256 + 32 */
    unsigned char name[TLSCTL_KEY_NAME_LEN];
    unsigned char hmac[32];
    unsigned char aes[32];
} tlsctl_key;

typedef struct {
    unsigned char name[TLSCTL_KEY_NAME_LEN];
    size_t index; /* in tlsctl_ctx_ext.keys */
} tlsctl_key_ref;

typedef struct tlsctl_ctx_ext {
    pthread_mutex_t lock;    /* guards keys / by_name / nkeys */
    tlsctl_key *keys;        /* keys[0] encrypts */
    tlsctl_key_ref *by_name; /* sorted by name: lookups in O(log n) */
    size_t nkeys;
    int renew;               /* TLSCTL_RENEW_* */
    int on_issue, on_resume; /* Python callables present (read w/o GIL) */
    PyObject *holder_ref;    /* weakref to the Python holder; GIL */
    struct tlsctl_ctx_ext *prev, *next; /* every live ext (for fork) */
    /* rotate_ticket_keys (guarded by lock): keys derived from master for
     * the time window time(NULL) / every, remade lazily when it changes */
    int rotating;
    uint64_t every;
    unsigned int keep;
    unsigned char master[TLSCTL_MASTER_MAX];
    size_t master_len;
    int64_t window;
} tlsctl_ctx_ext;

static void tlsctl_rotate_locked(tlsctl_ctx_ext *ext); /* rotation, below */

/* The tlsctl_ssl_idx slot of a connection tlsctl set up (see 9.) holds a
 * tagged integer, never a pointer: bit 0 set (NULL means untracked), bits
 * 1-2 the policy (TLSCTL_POLICY_*), the rest the tickets issued so far.
 * The tlsctl_rec_idx slot holds the Python record of a connection on a
 * context with ticket callbacks (a strong reference, released by the
 * ex_data free function). */
#define TLSCTL_IS_COUNT(p) ((((uintptr_t)(p)) & 1u) != 0)

static int tlsctl_ctx_idx = -1;
static int tlsctl_ssl_idx = -1;
static int tlsctl_rec_idx = -1;
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

static void tlsctl_keys_free(tlsctl_key *keys, tlsctl_key_ref *by_name,
                             size_t n)
{
    if (keys != NULL) {
        p_OPENSSL_cleanse(keys, n * sizeof(*keys));
        free(keys);
    }
    free(by_name); /* names and positions only: nothing secret */
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
    (void)parent;
    (void)ad;
    (void)idx;
    (void)argl;
    (void)argp;
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
    p_OPENSSL_cleanse(ext->master, sizeof(ext->master));
    tlsctl_decref(ext->holder_ref);
    pthread_mutex_destroy(&ext->lock);
    free(ext);
}

/* The key context slot holds a reference to an SSL_CTX. */
static void tlsctl_keyctx_free(void *parent, void *ptr, void *ad, int idx,
                               long argl, void *argp)
{
    (void)parent;
    (void)ad;
    (void)idx;
    (void)argl;
    (void)argp;
    if (ptr != NULL)
        p_SSL_CTX_free(ptr);
}

static int tlsctl_keyctx_dup(void *to, const void *from, void *from_d, int idx,
                             long argl, void *argp)
{
    SSL_CTX *ctx = *(SSL_CTX **)from_d;
    (void)to;
    (void)from;
    (void)idx;
    (void)argl;
    (void)argp;
    if (ctx != NULL)
        p_SSL_CTX_up_ref(ctx);
    return 1;
}

static void tlsctl_ssl_rec_free(void *parent, void *ptr, void *ad, int idx,
                                long argl, void *argp)
{
    (void)parent;
    (void)ad;
    (void)idx;
    (void)argl;
    (void)argp;
    tlsctl_decref(ptr);
}

/* SSL_dup copies ex_data pointers: give the copy its own reference.
 * (from_d points at the slot in 1.1.1 and 3.x alike.) */
static int tlsctl_ssl_rec_dup(void *to, const void *from, void *from_d, int idx,
                              long argl, void *argp)
{
    PyObject *obj = *(PyObject **)from_d;
    PyGILState_STATE g;
    (void)to;
    (void)from;
    (void)idx;
    (void)argl;
    (void)argp;
    if (obj != NULL) {
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
        tlsctl_ssl_idx = p_CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL, 0, NULL,
                                                   NULL, NULL, NULL);
    if (tlsctl_rec_idx < 0)
        tlsctl_rec_idx =
            p_CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL, 0, NULL, NULL,
                                      tlsctl_ssl_rec_dup, tlsctl_ssl_rec_free);
    if (tlsctl_keyctx_idx < 0)
        tlsctl_keyctx_idx =
            p_CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL, 0, NULL, NULL,
                                      tlsctl_keyctx_dup, tlsctl_keyctx_free);
    if (tlsctl_calls_idx < 0)
        tlsctl_calls_idx = p_CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL, 0,
                                                     NULL, NULL, NULL, NULL);
    /* Index 0 of SSL is _ssl's app data; a fresh index is never 0 for SSL
     * (OpenSSL reserves 0 for app data), but refuse to share it anyway. */
    return tlsctl_ctx_idx > 0 && tlsctl_ssl_idx > 0 && tlsctl_rec_idx > 0 &&
           tlsctl_keyctx_idx > 0 && tlsctl_calls_idx > 0;
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
    if (ext == NULL && tlsctl_ext_init() &&
        (ext = calloc(1, sizeof(*ext))) != NULL) {
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

/* The per-connection note in the tlsctl_calls_idx slot: bit 0, the decrypt
 * callback ran in this handshake; bit 1, one of its decisions makes OpenSSL
 * expect to send tickets; the rest, on_resume calls so far. */
#define TLSCTL_NOTE_RAN      1u
#define TLSCTL_NOTE_EXPECTED 2u
#define TLSCTL_NOTE_CALLS    2

/* Record a decision the way tls_decrypt_ticket (ssl/t1_lib.c) turns it into
 * its status, which sets ext.ticket_expected for NO_DECRYPT, EMPTY and
 * SUCCESS_RENEW. */
static uintptr_t tlsctl_note_decision(uintptr_t note, int status, int decision)
{
    int ret = status;
    switch (decision) {
    case SSL_TICKET_RETURN_IGNORE:
        ret = SSL_TICKET_NONE;
        break;
    case SSL_TICKET_RETURN_IGNORE_RENEW:
        if (ret != SSL_TICKET_EMPTY && ret != SSL_TICKET_NO_DECRYPT)
            ret = SSL_TICKET_NO_DECRYPT;
        break;
    case SSL_TICKET_RETURN_USE:
        ret = SSL_TICKET_SUCCESS;
        break;
    case SSL_TICKET_RETURN_USE_RENEW:
        ret = SSL_TICKET_SUCCESS_RENEW;
        break;
    default:
        break;
    }
    note |= TLSCTL_NOTE_RAN;
    if (ret == SSL_TICKET_NO_DECRYPT || ret == SSL_TICKET_EMPTY ||
        ret == SSL_TICKET_SUCCESS_RENEW)
        note |= TLSCTL_NOTE_EXPECTED;
    return note;
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
    SSL_CTX *ctx =
        tlsctl_keyctx_idx > 0 ? p_SSL_get_ex_data(s, tlsctl_keyctx_idx) : NULL;
    return tlsctl_ext_of(ctx != NULL ? ctx : p_SSL_get_SSL_CTX(s));
}

static int tlsctl_key_index(const SSL *s, const unsigned char *name, size_t len)
{
    tlsctl_ctx_ext *ext = tlsctl_keys_ext_of(s);
    int found;
    if (ext == NULL || name == NULL || len != TLSCTL_KEY_NAME_LEN)
        return -1;
    pthread_mutex_lock(&ext->lock);
    tlsctl_rotate_locked(ext);
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
    (void)alert;
    (void)arg;
    old = p_SSL_get_ex_data(s, tlsctl_keyctx_idx);
    if (old != ctx && p_SSL_CTX_up_ref(ctx) == 1) {
        if (p_SSL_set_ex_data(s, tlsctl_keyctx_idx, ctx) == 1)
            p_SSL_CTX_free(old); /* a second handshake (TLS 1.2) */
        else
            p_SSL_CTX_free(ctx); /* not recorded: the current context */
    }
    return SSL_CLIENT_HELLO_SUCCESS;
}

/* tlsctl's Python record of a connection on a context with ticket
 * callbacks (borrowed), or NULL: a connection made before
 * set_ticket_callbacks(), which the callbacks ignore. */
static PyObject *tlsctl_record_of(const SSL *s)
{
    return tlsctl_rec_idx > 0 ? p_SSL_get_ex_data(s, tlsctl_rec_idx) : NULL;
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
    res = PyObject_CallFunction(
        tlsctl_dispatch, "iOOiOOii", event, ext->holder_ref, rec, status,
        appdata ? appdata : Py_None, keyname ? keyname : Py_None, key_index,
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
    if (ext->holder_ref != NULL) { /* not removed meanwhile */
        res = tlsctl_call_python(ext, rec, TLSCTL_EVENT_ISSUE, -1, NULL, NULL,
                                 -1, 1);
        ok = 0; /* failure, or the dispatcher kept an exception */
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
                                const unsigned char *keyname,
                                size_t keyname_len, int status, void *arg)
{
    tlsctl_ctx_ext *ext = arg;
    int decision = tlsctl_default_decision(status);
    PyObject *rec = NULL;
    uintptr_t note = (uintptr_t)p_SSL_get_ex_data(s, tlsctl_calls_idx);
    if (ext == NULL)
        return decision;
    if (ext->on_resume && status != SSL_TICKET_NONE &&
        status != SSL_TICKET_EMPTY)
        rec = tlsctl_record_of(s);
    if (rec != NULL && (note >> TLSCTL_NOTE_CALLS) >= TLSCTL_MAX_RESUME_CALLS) {
        rec = NULL; /* the bound: never resume unasked */
        decision = SSL_TICKET_RETURN_IGNORE_RENEW;
    }
    if (rec != NULL) {
        PyGILState_STATE g;
        note += (uintptr_t)1 << TLSCTL_NOTE_CALLS;
        g = PyGILState_Ensure();
        PyObject *appdata = NULL, *name = NULL, *res;
        void *data = NULL;
        size_t len = 0;
        if (ss != NULL &&
            p_SSL_SESSION_get0_ticket_appdata(ss, &data, &len) == 1)
            appdata =
                PyBytes_FromStringAndSize(data ? data : "", (Py_ssize_t)len);
        if (keyname != NULL)
            name = PyBytes_FromStringAndSize((const char *)keyname,
                                             (Py_ssize_t)keyname_len);
        if (ext->holder_ref == NULL) { /* removed meanwhile */
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
            if (v >= SSL_TICKET_RETURN_ABORT &&
                v <= SSL_TICKET_RETURN_USE_RENEW)
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
    if (ext->renew == TLSCTL_RENEW_NEVER &&
        decision == SSL_TICKET_RETURN_USE_RENEW)
        decision = SSL_TICKET_RETURN_USE;
    if (!p_SSL_set_ex_data(
            s, tlsctl_calls_idx,
            (void *)tlsctl_note_decision(note, status, decision)) &&
        decision >= SSL_TICKET_RETURN_USE)
        decision =
            SSL_TICKET_RETURN_IGNORE_RENEW; /* unrecorded: never resume */
    return decision;
}

/* 0 when this handshake's ticket decisions mean OpenSSL would send no ticket
 * after it (USE: resumed without renewal; IGNORE: full handshake, no
 * ticket), else 1.  Native defer sends its tickets only where stock would
 * (see tlsctl_queue_tickets). */
static int tlsctl_ticket_expected(const SSL *s)
{
    uintptr_t note;
    if (tlsctl_calls_idx <= 0)
        return 1;
    note = (uintptr_t)p_SSL_get_ex_data(s, tlsctl_calls_idx);
    return !(note & TLSCTL_NOTE_RAN) || (note & TLSCTL_NOTE_EXPECTED);
}

static int tlsctl_install_ticket_cb(SSL_CTX *ctx, tlsctl_ctx_ext *ext)
{
    int needed =
        ext->renew == TLSCTL_RENEW_NEVER || ext->on_issue || ext->on_resume;
    if (!needed)
        return p_SSL_CTX_set_session_ticket_cb(ctx, NULL, NULL, NULL);
    return p_SSL_CTX_set_session_ticket_cb(
        ctx, ext->on_issue ? tlsctl_gen_ticket_cb : NULL, tlsctl_dec_ticket_cb,
        ext);
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

/* Attach a connection's Python record (a new strong reference) to ssl.
 * The GIL is held (called from apply.c's apply).  1, or 0 on failure. */
static int tlsctl_conn_register(SSL *ssl, PyObject *record)
{
    PyObject *old;
    if (!tlsctl_ext_init())
        return 0;
    old = p_SSL_get_ex_data(ssl, tlsctl_rec_idx);
    Py_INCREF(record);
    if (!p_SSL_set_ex_data(ssl, tlsctl_rec_idx, record)) {
        Py_DECREF(record);
        return 0;
    }
    Py_XDECREF(old);
    return 1;
}

/* 1 once nothing can call back into Python on ssl any more: a finished
 * TLS 1.3 handshake (TLS 1.2 may renegotiate). */
static int tlsctl_guard_done(SSL *ssl)
{
    return tlsctl_bound && p_SSL_is_init_finished(ssl) &&
           p_SSL_version(ssl) == TLS1_3_VERSION;
}
