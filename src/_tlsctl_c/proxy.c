/* proxy.c: the one per-connection path (9.): the connection's record in
 * ex_data and the first-write proxy.  How connections get one: apply.c. */

/* ---- per-connection record in the SSL's ex_data ------------------- */

/* A connection's (issued * 4 + policy), or -1 when tlsctl never set it
 * up (see TLSCTL_IS_COUNT). */
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

/* Record ssl with this policy (if not recorded yet), then count n more
 * issued tickets.  1, or 0 when OpenSSL could not store it. */
static int tlsctl_conn_track(SSL *ssl, int policy, int n)
{
    long info = tlsctl_conn_info(ssl);
    if (info < 0)
        info = policy;
    info += 4L * n;
    return p_SSL_set_ex_data(ssl, tlsctl_ssl_idx,
                             (void *)(((uintptr_t)info << 1) | 1u)) == 1;
}

/* ---- the first-write proxy ---------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *real;        /* the connection's _ssl._SSLSocket */
    PyObject *record;      /* its ticket-callback record (8.), or NULL */
    SSL *ssl;              /* its SSL, proven when the proxy was made */
    int state;             /* TLSCTL_STATE_* */
    int n_full, n_resumed; /* the policy's tickets after a full / resumed
                            * handshake, still to be queued */
    int extra;             /* issue_tickets()'s, still to be queued */
    int memory;            /* the SSL writes to a memory BIO (SSLObject) */
    int stash;             /* the stash filter holds OpenSSL's own tickets
                            * until the next write (7.) */
} tlsctl_fw;

static PyTypeObject *tlsctl_fw_type = NULL;
static PyObject *tlsctl_sslsocket_type = NULL;
static PyObject *tlsctl_raise_error = NULL;
static PyObject *tlsctl_s_write = NULL, *tlsctl_s_do_handshake = NULL,
                *tlsctl_s_read = NULL, *tlsctl_s_owner = NULL,
                *tlsctl_s_sslobj = NULL, *tlsctl_s_real = NULL,
                *tlsctl_s_context = NULL, *tlsctl_s_exc = NULL;
static Py_hash_t tlsctl_h_write = -1, tlsctl_h_real = -1, tlsctl_h_read = -1,
                 tlsctl_h_do_handshake = -1;

#define TLSCTL_NAME_OTHER        0 /* forwarded to the real object */
#define TLSCTL_NAME_WRITE        1 /* the proxy's own write */
#define TLSCTL_NAME_REAL         2 /* the real object itself */
#define TLSCTL_NAME_DO_HANDSHAKE 3 /* guarded, or forwarded */
#define TLSCTL_NAME_READ         4 /* guarded, or forwarded */

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
    if (name == tlsctl_s_read)
        return TLSCTL_NAME_READ;
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
    if (h == tlsctl_h_read && PyUnicode_Compare(name, tlsctl_s_read) == 0)
        return TLSCTL_NAME_READ;
    if (h == tlsctl_h_do_handshake &&
        PyUnicode_Compare(name, tlsctl_s_do_handshake) == 0)
        return TLSCTL_NAME_DO_HANDSHAKE;
    return TLSCTL_NAME_OTHER;
}

/* Raise tlsctl's OpenSSLError(what, OpenSSL's error queue) through the
 * Python function tlsctl_fast_init was given; returns NULL. */
static PyObject *tlsctl_raise_openssl(const char *what)
{
    PyObject *r = PyObject_CallFunction(tlsctl_raise_error, "s", what);
    if (r != NULL) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_RuntimeError, what);
    }
    return NULL;
}

/* PyErr_GetRaisedException is 3.12+; the stable ABI tlsctl is built for
 * (3.9) has only the Fetch / Normalize pair, deprecated since 3.12. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
/* Take out a link back to exc from v's __context__ chain, as CPython's
 * `raise` does, so that setting v as exc's context makes no cycle (Floyd's
 * walk: a chain that is already cyclic ends the loop too). */
static void tlsctl_cut_context(PyObject *v, PyObject *exc)
{
    PyObject *o = v, *slow = v, *ctx;
    int step = 0;
    for (;;) {
        if ((ctx = PyException_GetContext(o)) == NULL)
            return;
        Py_DECREF(ctx); /* o's __context__ keeps it alive */
        if (ctx == exc) {
            PyException_SetContext(o, NULL);
            return;
        }
        o = ctx;
        if (o == slow)
            return;
        if (step++ & 1) {
            slow = PyException_GetContext(slow);
            Py_XDECREF(slow);
        }
    }
}

/* If a ticket callback left an exception in the record (8.), raise it
 * instead of the current one (if any), which becomes its __context__, as
 * `raise exc` in an except block would; its traceback stays the
 * callback's.  Returns 1 when it raised (or reading the record failed),
 * 0 with the current exception, if any, left as it was. */
static int tlsctl_fw_reraise(tlsctl_fw *fw)
{
    PyObject *exc, *t, *v, *tb;
    if (fw->record == NULL)
        return 0;
    PyErr_Fetch(&t, &v, &tb);
    exc = PyObject_GetAttr(fw->record, tlsctl_s_exc);
    if (exc == Py_None) {
        Py_DECREF(exc);
        PyErr_Restore(t, v, tb);
        return 0;
    }
    if (exc == NULL ||
        PyObject_SetAttr(fw->record, tlsctl_s_exc, Py_None) < 0 ||
        !PyExceptionInstance_Check(exc)) {
        if (exc != NULL && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "tlsctl: a callback record's exc "
                                             "is not an exception");
        Py_XDECREF(exc);
        Py_XDECREF(t);
        Py_XDECREF(v);
        Py_XDECREF(tb);
        return 1;
    }
    if (t != NULL) {
        PyErr_NormalizeException(&t, &v, &tb);
        if (tb != NULL)
            PyException_SetTraceback(v, tb);
        if (v == exc) {
            Py_DECREF(v);
        } else {
            tlsctl_cut_context(v, exc);
            PyException_SetContext(exc, v); /* steals v */
        }
        Py_DECREF(t);
        Py_XDECREF(tb);
    }
    Py_INCREF(Py_TYPE(exc));
    PyErr_Restore((PyObject *)Py_TYPE(exc), exc, PyException_GetTraceback(exc));
    return 1;
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

/* Put the real object back on the connection (if the proxy is still
 * there: close() / unwrap() may have replaced it, and the python
 * mechanism's proxy may stand in front of this one). */
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

/* Done: the connection is the stock object from now on. */
static int tlsctl_fw_retire(tlsctl_fw *fw)
{
    if (fw->stash && tlsctl_stash_remove(fw->ssl))
        fw->stash = 0;
    fw->state = TLSCTL_STATE_STOCK;
    Py_CLEAR(fw->record);
    return tlsctl_fw_disarm(fw);
}

/* Nothing left for the proxy after the handshake: TLS 1.2 (tickets are
 * TLS 1.3's post-handshake messages; a TLS 1.2 connection with ticket
 * callbacks may renegotiate, so a guarded one stays), or a guarded TLS
 * 1.3 connection with nothing due. */
static int tlsctl_fw_idle(tlsctl_fw *fw)
{
    if (fw->state == TLSCTL_STATE_FLUSHING || !p_SSL_is_init_finished(fw->ssl))
        return 0;
    if (p_SSL_version(fw->ssl) == TLS1_3_VERSION)
        /* not while the capture filter stands: a first write that a
         * non-blocking socket refused is retried through the proxy, which
         * then takes the filter out (tlsctl_fw_after_write) */
        return fw->state == TLSCTL_STATE_GUARDED && !fw->stash &&
               tlsctl_stash_of(fw->ssl) == NULL;
    return fw->record == NULL;
}

/* After a successful call: raise what a callback left although OpenSSL
 * went on, and retire once nothing is due and no callback can run. */
static int tlsctl_fw_settle(tlsctl_fw *fw)
{
    if (tlsctl_fw_reraise(fw))
        return -1;
    if (fw->state == TLSCTL_STATE_STOCK)
        /* retired while the python mechanism's proxy stood in front of
         * it, which then put it back: step aside now */
        return tlsctl_fw_disarm(fw);
    if (fw->state == TLSCTL_STATE_GUARDED && !fw->stash &&
        (fw->record == NULL || tlsctl_guard_done(fw->ssl)))
        return tlsctl_fw_retire(fw);
    return 0;
}

/* real.<method>(arg) (arg may be NULL); a callback's exception replaces
 * a failure.  0, or -1 with the exception set. */
static int tlsctl_fw_call(tlsctl_fw *fw, PyObject *method, PyObject *arg,
                          PyObject **result)
{
    PyObject *r = PyObject_CallMethodObjArgs(fw->real, method, arg, NULL);
    if (r == NULL) {
        tlsctl_fw_reraise(fw);
        return -1;
    }
    if (result != NULL)
        *result = r;
    else
        Py_DECREF(r);
    return 0;
}

static PyObject *tlsctl_fw_getattro(PyObject *self, PyObject *name)
{
    tlsctl_fw *fw = (tlsctl_fw *)self;
    int kind = tlsctl_name_kind(name);
    if (kind != TLSCTL_NAME_REAL && fw->state != TLSCTL_STATE_STOCK &&
        tlsctl_fw_idle(fw)) {
        /* Put the real object back at the first look after the handshake,
         * so the connection costs what stock costs from then on. */
        if (tlsctl_fw_retire(fw) < 0)
            return NULL;
        return PyObject_GetAttr(fw->real, name);
    }
    switch (kind) {
    case TLSCTL_NAME_WRITE:
        return PyObject_GenericGetAttr(self, name);
    case TLSCTL_NAME_REAL:
        Py_INCREF(fw->real);
        return fw->real;
    case TLSCTL_NAME_READ:
    case TLSCTL_NAME_DO_HANDSHAKE:
        /* A connection with ticket callbacks: the proxy's own, which
         * re-raise a callback's exception.  (No bound method is cached
         * for the others: nothing would drop it from an idle connection,
         * +86 B each, measured.) */
        if (fw->record != NULL)
            return PyObject_GenericGetAttr(self, name);
        break;
    default:
        break;
    }
    return PyObject_GetAttr(fw->real, name);
}

static int tlsctl_fw_setattro(PyObject *self, PyObject *name, PyObject *value)
{
    return PyObject_SetAttr(((tlsctl_fw *)self)->real, name, value);
}

static void tlsctl_fw_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(((tlsctl_fw *)self)->record);
    Py_XDECREF(((tlsctl_fw *)self)->real);
    PyObject_Free(self);
    Py_DECREF(tp);
}

/* DUE -> queue the tickets with SSL_new_session_ticket: FLUSHING on a
 * socket, or (a memory BIO, where SSL_write writes them ahead of the data;
 * or nothing to send) GUARDED.  0, or -1 with the exception set. */
static int tlsctl_fw_queue(tlsctl_fw *fw)
{
    int rc =
        tlsctl_queue_tickets(fw->ssl, fw->n_full, fw->n_resumed, fw->extra);
    if (rc == TLSCTL_ERR_HANDSHAKE) {
        /* The write would run the handshake itself: run it first (it
         * raises SSLWantReadError etc. as the write would; the proxy stays
         * for the retry), then queue. */
        if (tlsctl_fw_call(fw, tlsctl_s_do_handshake, NULL, NULL) < 0)
            return -1;
        rc =
            tlsctl_queue_tickets(fw->ssl, fw->n_full, fw->n_resumed, fw->extra);
    }
    if (rc < 0) {
        if (tlsctl_fw_retire(fw) == 0)
            tlsctl_raise_openssl(
                "SSL_new_session_ticket failed before the first write");
        return -1;
    }
    fw->n_full = fw->n_resumed = fw->extra = 0;
    if (rc > 0 && !tlsctl_conn_track(fw->ssl, TLSCTL_POLICY_NONE, rc)) {
        tlsctl_raise_openssl("counting the tickets issued failed");
        return -1;
    }
    fw->state =
        rc > 0 && !fw->memory ? TLSCTL_STATE_FLUSHING : TLSCTL_STATE_GUARDED;
    return 0;
}

/* FLUSHING -> GUARDED: the handshake driver writes the queued tickets, not
 * SSL_write: when a socket takes part of a ticket record, SSL_write's
 * retry with the caller's buffer fails OpenSSL's pending-write check
 * (SSL_R_BAD_LENGTH); SSL_do_handshake resumes cleanly.  The stash filter
 * captures them (a captured write always succeeds) and the data record
 * takes them along in one write() (10.); a stash connection's filter
 * already sends what it releases with the next record. */
static int tlsctl_fw_flush(tlsctl_fw *fw)
{
    int rc, capture = fw->stash ? 0 : tlsctl_capture(fw->ssl, 1);
    if (capture < 0) {
        tlsctl_raise_openssl("holding the tickets for the first write failed");
        return -1;
    }
    rc = tlsctl_fw_call(fw, tlsctl_s_do_handshake, NULL, NULL);
    if (capture)
        tlsctl_capture(fw->ssl, 0);
    if (rc < 0)
        return -1;
    fw->state = TLSCTL_STATE_GUARDED;
    return 0;
}

/* After the first write returned: a stash connection's held tickets are
 * out once its filter can go (a partial drain keeps it, and the proxy, for
 * the next write); elsewhere the capture filter goes. */
static int tlsctl_fw_after_write(tlsctl_fw *fw)
{
    size_t held = 0, released = 0;
    if (!fw->stash) {
        tlsctl_stash_remove(fw->ssl); /* sent: nothing left to capture */
    } else {
        tlsctl_stash_state(fw->ssl, &held, &released);
        if (!tlsctl_stash_remove(fw->ssl))
            return 0;
        fw->stash = 0;
        if (!tlsctl_conn_track(fw->ssl, TLSCTL_POLICY_NONE, (int)released)) {
            tlsctl_raise_openssl("counting the tickets issued failed");
            return -1;
        }
    }
    if (fw->state == TLSCTL_STATE_DUE) /* the stash's: nothing queued */
        fw->state = TLSCTL_STATE_GUARDED;
    return 0;
}

static PyObject *tlsctl_fw_write(PyObject *self, PyObject *data)
{
    tlsctl_fw *fw = (tlsctl_fw *)self;
    PyObject *result = NULL;
    /* A stash connection's policy tickets are OpenSSL's own, held by the
     * filter; only issue_tickets()'s are queued. */
    if (fw->state == TLSCTL_STATE_DUE && (!fw->stash || fw->extra > 0) &&
        tlsctl_fw_queue(fw) < 0)
        return NULL;
    if (fw->state == TLSCTL_STATE_FLUSHING && tlsctl_fw_flush(fw) < 0)
        return NULL;
    if (tlsctl_fw_call(fw, tlsctl_s_write, data, &result) < 0)
        return NULL;
    if ((fw->state != TLSCTL_STATE_STOCK && tlsctl_fw_after_write(fw) < 0) ||
        tlsctl_fw_settle(fw) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* do_handshake() and read() of a connection with ticket callbacks: the
 * real call, then a callback's exception re-raised (8.). */
static PyObject *tlsctl_fw_guarded(tlsctl_fw *fw, PyObject *result)
{
    if (result == NULL) {
        tlsctl_fw_reraise(fw);
        return NULL;
    }
    if (tlsctl_fw_settle(fw) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *tlsctl_fw_do_handshake(PyObject *self, PyObject *unused)
{
    tlsctl_fw *fw = (tlsctl_fw *)self;
    (void)unused;
    return tlsctl_fw_guarded(
        fw, PyObject_CallMethodObjArgs(fw->real, tlsctl_s_do_handshake, NULL));
}

static PyObject *tlsctl_fw_read(PyObject *self, PyObject *args)
{
    tlsctl_fw *fw = (tlsctl_fw *)self;
    PyObject *method = PyObject_GetAttr(fw->real, tlsctl_s_read), *result;
    if (method == NULL)
        return NULL;
    result = PyObject_Call(method, args, NULL);
    Py_DECREF(method);
    return tlsctl_fw_guarded(fw, result);
}

/* Only tlsctl_fw_install makes proxies: one made from Python would have no
 * real object to forward to. */
static PyObject *tlsctl_fw_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    (void)tp;
    (void)args;
    (void)kw;
    PyErr_SetString(PyExc_TypeError,
                    "FirstWriteProxy objects are made by tlsctl only");
    return NULL;
}

static PyMethodDef tlsctl_fw_methods[] = {
    {"write", tlsctl_fw_write, METH_O,
     "Queue and write the connection's tickets, then the data."},
    {"do_handshake", tlsctl_fw_do_handshake, METH_NOARGS,
     "The real do_handshake(), then a ticket callback's exception."},
    {"read", tlsctl_fw_read, METH_VARARGS,
     "The real read(), then a ticket callback's exception."},
    {NULL, NULL, 0, NULL}};

static PyType_Slot tlsctl_fw_slots[] = {
    {Py_tp_new, (void *)tlsctl_fw_new},
    {Py_tp_dealloc, (void *)tlsctl_fw_dealloc},
    {Py_tp_getattro, (void *)tlsctl_fw_getattro},
    {Py_tp_setattro, (void *)tlsctl_fw_setattro},
    {Py_tp_methods, (void *)tlsctl_fw_methods},
    {Py_tp_doc, (void *)"tlsctl's stand-in for a connection's _sslobj until "
                        "its first write (see tlsctl._policy)."},
    {0, NULL}};

static PyType_Spec tlsctl_fw_spec = {"tlsctl._binding.FirstWriteProxy",
                                     sizeof(tlsctl_fw), 0, Py_TPFLAGS_DEFAULT,
                                     tlsctl_fw_slots};
