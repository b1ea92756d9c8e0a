/* proxy.c: the per-connection path in C: the first-write proxy, the
 * plan applied to new connections, issue_tickets' arm (9.). */

/* ---- the first-write proxy in C (see 9.) -------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *real;          /* the connection's _ssl._SSLSocket */
    SSL *ssl;                /* its SSL, proven when the proxy was made */
    int queue;               /* tickets are still to be queued */
    int n_full, n_resumed;   /* the policy's: after a full / resumed handshake */
    int extra;               /* issue_tickets(): whatever the handshake */
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
        rc = tlsctl_queue_tickets(fw->ssl, fw->n_full, fw->n_resumed, fw->extra);
        if (rc == TLSCTL_ERR_HANDSHAKE) {
            /* The write would run the handshake itself: run it first (it
             * raises SSLWantReadError etc. as the write would; the proxy
             * stays for the retry), then queue. */
            if (tlsctl_fw_call(fw->real, tlsctl_s_do_handshake, NULL, NULL) < 0)
                return NULL;
            rc = tlsctl_queue_tickets(fw->ssl, fw->n_full, fw->n_resumed,
                                      fw->extra);
        }
        if (rc < 0) {
            if (tlsctl_fw_disarm(fw) < 0)
                return NULL;
            return tlsctl_raise_openssl();
        }
        fw->queue = 0;
        fw->n_full = fw->n_resumed = fw->extra = 0;
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
    int waiting = fw->n_full + fw->extra;
    if (n < 1 || waiting > TLSCTL_MAX_TICKETS - n) {
        PyErr_Format(PyExc_ValueError,
                     "at most %d tickets can wait for one write; %d already "
                     "do, %d more asked for",
                     TLSCTL_MAX_TICKETS, waiting, n);
        return -1;
    }
    fw->extra += n;
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
                             int n_full, int n_resumed, int extra)
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
    fw->extra = extra;
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
        if (tlsctl_fw_install(conn, current, ssl, 0, 0, n) < 0) {
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
            rc = tlsctl_fw_install(conn, real, ssl, n, renew && n > 0 ? 1 : 0, 0);
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

/* waiting(sslobj) -> bool: a proxy whose next write sends tickets (none
 * before the handshake, after close_notify, on TLS 1.2, or where stock
 * would send none after this handshake). */
static PyObject *tlsctl_fast_waiting(PyObject *unused, PyObject *sslobj)
{
    tlsctl_fw *fw = (tlsctl_fw *)sslobj;
    (void)unused;
    if (Py_TYPE(sslobj) == tlsctl_fw_type
            && (fw->flushing
                || (fw->queue && tlsctl_pending_tickets(fw->ssl, fw->n_full,
                                                        fw->n_resumed,
                                                        fw->extra) > 0)))
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
