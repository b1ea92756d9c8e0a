/* apply.c: the per-connection path's entry points (9.): the plan applied
 * to new server connections (make_apply), issue_tickets' arm, the report
 * behind connection_state, and their registration with Python. */

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

/* The SSL behind sslobj (conn._sslobj: a proxy's, or the real object's,
 * proven as above) when tlsctl tracks it, its recorded info (policy and
 * tickets issued, tlsctl_conn_info) in *info; else NULL, no exception set.
 * What report and quiet both answer from. */
static SSL *tlsctl_tracked_ssl(PyObject *sslobj, long *info)
{
    SSL *ssl = Py_TYPE(sslobj) == tlsctl_fw_type ? ((tlsctl_fw *)sslobj)->ssl
                                                 : tlsctl_real_ssl(sslobj);
    if (ssl == NULL || (*info = tlsctl_conn_info(ssl)) < 0)
        return NULL;
    return ssl;
}

/* A new proxy for (real, ssl) in state, in front of conn._sslobj, with
 * the connection's callback record if it has one; a new reference, or
 * NULL with the exception set. */
static tlsctl_fw *tlsctl_fw_install(PyObject *conn, PyObject *real, SSL *ssl,
                                    int state)
{
    tlsctl_fw *fw = (tlsctl_fw *)PyType_GenericAlloc(tlsctl_fw_type, 0);
    BIO *w;
    if (fw == NULL)
        return NULL;
    Py_INCREF(real);
    fw->real = real;
    fw->record = tlsctl_record_of(ssl);
    Py_XINCREF(fw->record);
    fw->ssl = ssl;
    fw->state = state;
    fw->n_full = fw->n_resumed = fw->extra = fw->stash = 0;
    w = p_SSL_get_wbio(ssl);
    if (w != NULL && p_BIO_method_type(w) == tlsctl_stash_type)
        w = p_BIO_next(w); /* the stash filter stands in front */
    fw->memory = w != NULL && p_BIO_method_type(w) == BIO_TYPE_MEM;
    if (PyObject_SetAttr(conn, tlsctl_s_sslobj, (PyObject *)fw) < 0) {
        Py_DECREF(fw);
        return NULL;
    }
    return fw;
}

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
    fw->state = TLSCTL_STATE_DUE;
    return 0;
}

/* arm(conn, n) -> None, for issue_tickets(): n more tickets with the next
 * write, through the proxy already in front of conn._sslobj or a new one.
 * TypeError when conn._sslobj is neither (the caller proved it first). */
static PyObject *tlsctl_fast_arm(PyObject *unused, PyObject *args)
{
    PyObject *conn, *current;
    tlsctl_fw *fw = NULL;
    SSL *ssl;
    int n, rc = -1;
    (void)unused;
    if (!PyArg_ParseTuple(args, "Oi:arm", &conn, &n))
        return NULL;
    if ((current = PyObject_GetAttr(conn, tlsctl_s_sslobj)) == NULL)
        return NULL;
    if (Py_TYPE(current) == tlsctl_fw_type) {
        fw = (tlsctl_fw *)current;
        if (fw->state == TLSCTL_STATE_STOCK && fw->record == NULL) {
            /* retired, but back in front (the python mechanism's proxy
             * stood before it when it retired) */
            fw->record = tlsctl_record_of(fw->ssl);
            Py_XINCREF(fw->record);
        }
        rc = tlsctl_add_count(fw, n);
    } else if ((ssl = tlsctl_real_ssl(current)) == NULL) {
        PyErr_SetString(PyExc_TypeError, "arm: not a proven connection");
    } else if (!tlsctl_conn_track(ssl, TLSCTL_POLICY_NONE, 0)) {
        tlsctl_raise_openssl("attaching tlsctl's state to a connection failed");
    } else if ((fw = tlsctl_fw_install(conn, current, ssl,
                                       TLSCTL_STATE_GUARDED)) != NULL) {
        rc = tlsctl_add_count(fw, n);
        Py_DECREF(fw);
    }
    Py_DECREF(current);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* The tickets a defer connection sends after a full handshake: count, or
 * (count < 0) its context's num_tickets now, so a later
 * `ctx.num_tickets = n` applies to new connections; at most
 * TLSCTL_MAX_TICKETS. */
static int tlsctl_deferred_tickets(SSL *ssl, long count)
{
    size_t n = count >= 0 ? (size_t)count
                          : p_SSL_CTX_get_num_tickets(p_SSL_get_SSL_CTX(ssl));
    return n > TLSCTL_MAX_TICKETS ? TLSCTL_MAX_TICKETS : (int)n;
}

/* The plan's settings (make_apply's arguments). */
#define TLSCTL_PLAN_POLICY   0
#define TLSCTL_PLAN_COUNT    1
#define TLSCTL_PLAN_STASH    2
#define TLSCTL_PLAN_RECORD   3
#define TLSCTL_PLAN_FALLBACK 4

/* Set up ssl (tracked, server side) as its plan says; 0, or -1 with the
 * exception set. */
static int tlsctl_apply_policy(PyObject *plan, PyObject *conn, PyObject *real,
                               SSL *ssl)
{
    long policy = PyLong_AsLong(PyTuple_GetItem(plan, TLSCTL_PLAN_POLICY));
    long count = PyLong_AsLong(PyTuple_GetItem(plan, TLSCTL_PLAN_COUNT));
    int stash = PyTuple_GetItem(plan, TLSCTL_PLAN_STASH) == Py_True;
    PyObject *factory = PyTuple_GetItem(plan, TLSCTL_PLAN_RECORD), *record;
    tlsctl_fw *fw;
    int n, rc;
    if (factory != Py_None) {
        /* A context with ticket callbacks: the record they reach the
         * connection through, and where they leave an exception (8.). */
        if ((record = PyObject_CallFunctionObjArgs(factory, conn, NULL)) ==
            NULL)
            return -1;
        rc = tlsctl_conn_register(ssl, record);
        Py_DECREF(record);
        if (!rc) {
            tlsctl_raise_openssl(
                "attaching tlsctl's record to a new connection failed");
            return -1;
        }
    }
    if (policy == TLSCTL_POLICY_IMMEDIATE || policy == TLSCTL_POLICY_NONE) {
        if (count >= 0)
            p_SSL_set_num_tickets(ssl, (size_t)count);
    } else if (stash) {
        /* OpenSSL makes the tickets; the stash holds them (its info
         * callback also sets TCP_QUICKACK). */
        p_SSL_set_num_tickets(ssl, (size_t)tlsctl_deferred_tickets(ssl, count));
        if (tlsctl_stash_install(ssl) != 1) {
            tlsctl_raise_openssl(
                "installing the ticket stash on a new connection failed");
            return -1;
        }
    } else {
        p_SSL_set_num_tickets(ssl, 0); /* no ticket in the handshake */
        tlsctl_quickack_install(ssl);
    }
    if (policy == TLSCTL_POLICY_DEFER) {
        if ((fw = tlsctl_fw_install(conn, real, ssl, TLSCTL_STATE_DUE)) == NULL)
            return -1;
        if (stash) {
            fw->stash = 1;
            Py_DECREF(fw);
        } else {
            /* At most one after a resumed handshake, as stock; none where
             * this handshake's ticket decisions (renew_on_resume, on_resume)
             * mean stock sends none: see tlsctl_pending_tickets. */
            n = tlsctl_deferred_tickets(ssl, count);
            fw->n_full = n;
            fw->n_resumed = n > 0 ? 1 : 0;
            Py_DECREF(fw);
        }
    } else if (factory != Py_None) {
        if ((fw = tlsctl_fw_install(conn, real, ssl, TLSCTL_STATE_GUARDED)) ==
            NULL)
            return -1;
        Py_DECREF(fw);
    }
    return 0;
}

/* apply(conn): tlsctl's policy for a server connection that
 * SSLContext.wrap_socket / wrap_bio just made (see 9. and _policy),
 * before its handshake starts.  self is make_apply's tuple.  The
 * connection is tracked in the SSL's ex_data; for defer and suppress its
 * own num_tickets becomes 0 (its handshake sends none; the context's
 * value, the user's knob, is left alone) and it gets TCP_QUICKACK (10.);
 * for immediate with a count, its num_tickets is that count; for defer a
 * first-write proxy in state DUE (with the stash: the filter in front of
 * its write BIO), and on a context with ticket callbacks a proxy in state
 * GUARDED otherwise.  fallback(conn) handles a connection whose SSL
 * cannot be proven here (it raises the reason).  Client connections are
 * left exactly as stock. */
static PyObject *tlsctl_fast_apply(PyObject *self, PyObject *conn)
{
    PyObject *real, *r;
    SSL *ssl;
    long policy;
    int rc = 0;
    if ((real = PyObject_GetAttr(conn, tlsctl_s_sslobj)) == NULL)
        return NULL;
    policy = PyLong_AsLong(PyTuple_GetItem(self, TLSCTL_PLAN_POLICY));
    if (real == Py_None) {
        rc = 0; /* not connected: no SSL yet */
    } else if ((ssl = tlsctl_real_ssl(real)) != NULL && !p_SSL_is_server(ssl)) {
        rc = 0;
    } else if (ssl == NULL || !tlsctl_conn_track(ssl, (int)policy, 0)) {
        r = PyObject_CallFunctionObjArgs(
            PyTuple_GetItem(self, TLSCTL_PLAN_FALLBACK), conn, NULL);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    } else {
        rc = tlsctl_apply_policy(self, conn, real, ssl);
    }
    Py_DECREF(real);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef tlsctl_fast_apply_def = {
    "apply", tlsctl_fast_apply, METH_O,
    "Apply tlsctl's policy to a server connection just made (in C)."};

/* make_apply(policy, count, stash, record_factory, fallback): the
 * function the wrap_socket / wrap_bio hooks call with each new connection
 * of a context.  count < 0 follows the context's num_tickets;
 * record_factory(conn) makes the record of a connection on a context with
 * ticket callbacks (None: no callbacks). */
static PyObject *tlsctl_fast_make_apply(PyObject *unused, PyObject *args)
{
    PyObject *record_factory, *fallback, *plan, *apply;
    int policy, count, stash;
    (void)unused;
    if (!PyArg_ParseTuple(args, "iipOO:make_apply", &policy, &count, &stash,
                          &record_factory, &fallback))
        return NULL;
    if (policy < TLSCTL_POLICY_NONE || policy > TLSCTL_POLICY_IMMEDIATE ||
        count < -1 || count > TLSCTL_MAX_TICKETS ||
        (stash && policy != TLSCTL_POLICY_DEFER) ||
        (policy == TLSCTL_POLICY_NONE && record_factory == Py_None &&
         count < 0)) {
        PyErr_SetString(PyExc_ValueError, "make_apply: bad settings");
        return NULL;
    }
    /* The flag as a bool: apply tests it by identity with Py_True. */
    plan = Py_BuildValue("(iiOOO)", policy, count, stash ? Py_True : Py_False,
                         record_factory, fallback);
    if (plan == NULL)
        return NULL;
    apply = PyCFunction_NewEx(&tlsctl_fast_apply_def, plan, NULL);
    Py_DECREF(plan);
    return apply;
}

/* report(sslobj) -> (policy, state, waiting, issued) or None: what tlsctl
 * knows of a connection (connection_state).  sslobj is conn._sslobj: a
 * proxy, or the real object (proven here); None when tlsctl never set the
 * connection up.  waiting: the next write sends tickets (none before the
 * handshake, after close_notify, on TLS 1.2, or where stock would send
 * none after this handshake). */
static PyObject *tlsctl_fast_report(PyObject *unused, PyObject *sslobj)
{
    tlsctl_fw *fw =
        Py_TYPE(sslobj) == tlsctl_fw_type ? (tlsctl_fw *)sslobj : NULL;
    SSL *ssl;
    long info;
    size_t held = 0, released = 0;
    int waiting, state = fw != NULL ? fw->state : TLSCTL_STATE_STOCK;
    (void)unused;
    if ((ssl = tlsctl_tracked_ssl(sslobj, &info)) == NULL)
        Py_RETURN_NONE;
    if (fw != NULL && fw->stash)
        tlsctl_stash_state(ssl, &held, &released);
    waiting =
        state == TLSCTL_STATE_FLUSHING || held > 0 ||
        (state == TLSCTL_STATE_DUE &&
         tlsctl_pending_tickets(ssl, fw->n_full, fw->n_resumed, fw->extra) > 0);
    return Py_BuildValue("(iiOl)", (int)(info & 3), state,
                         waiting ? Py_True : Py_False,
                         (info >> 2) + (long)released);
}

/* quiet(sslobj) -> True, False or None: whether the connection behind
 * sslobj (conn._sslobj: a proxy, or the real object, proven here) needs
 * TCP_QUICKACK now (10.): a server connection whose TLS 1.3 handshake is
 * done and whose tlsctl policy sends no ticket in the handshake (defer,
 * suppress), as recorded when the connection was made.  None when tlsctl's
 * C side does not track it (a stock context; the python mechanism's defer
 * connections, or False when it tracks them for a count or callbacks:
 * _quickack asks Python then).  For _quickack's memory-BIO hooks, once per
 * handshake: one call instead of connection_state()'s Python. */
static PyObject *tlsctl_fast_quiet(PyObject *unused, PyObject *sslobj)
{
    SSL *ssl;
    long info, policy;
    (void)unused;
    if ((ssl = tlsctl_tracked_ssl(sslobj, &info)) == NULL)
        Py_RETURN_NONE;
    policy = info & 3;
    return PyBool_FromLong(
        (policy == TLSCTL_POLICY_DEFER || policy == TLSCTL_POLICY_SUPPRESS) &&
        p_SSL_is_server(ssl) && p_SSL_is_init_finished(ssl) &&
        p_SSL_version(ssl) == TLS1_3_VERSION);
}

static PyMethodDef tlsctl_fast_functions[] = {
    {"arm", tlsctl_fast_arm, METH_VARARGS, "arm(conn, n) -> None"},
    {"make_apply", tlsctl_fast_make_apply, METH_VARARGS,
     "make_apply(policy, count, stash, record_factory, fallback)"},
    {"report", tlsctl_fast_report, METH_O,
     "report(sslobj) -> (policy, state, waiting, issued) or None"},
    {"quiet", tlsctl_fast_quiet, METH_O,
     "quiet(sslobj) -> whether it needs TCP_QUICKACK now, or None"},
    {NULL, NULL, 0, NULL}};

static PyObject *tlsctl_intern(const char *s, int *ok)
{
    PyObject *u = PyUnicode_InternFromString(s);
    if (u == NULL)
        *ok = 0;
    return u;
}

/* Called once at import: put FirstWriteProxy, arm, make_apply, report and
 * quiet into the dict at namespace_dict (id() of a dict the caller keeps
 * alive).  raise_error(what) raises tlsctl's OpenSSLError. */
static int tlsctl_fast_init(uintptr_t namespace_dict, uintptr_t sslsocket_type,
                            uintptr_t raise_error)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *ns = (PyObject *)namespace_dict, *f;
    PyMethodDef *def;
    int ok = 1;
    if (tlsctl_fw_type == NULL) {
        tlsctl_s_write = tlsctl_intern("write", &ok);
        tlsctl_s_do_handshake = tlsctl_intern("do_handshake", &ok);
        tlsctl_s_read = tlsctl_intern("read", &ok);
        tlsctl_s_owner = tlsctl_intern("owner", &ok);
        tlsctl_s_sslobj = tlsctl_intern("_sslobj", &ok);
        tlsctl_s_real = tlsctl_intern("_real", &ok);
        tlsctl_s_context = tlsctl_intern("context", &ok);
        tlsctl_s_exc = tlsctl_intern("exc", &ok);
        if (ok) {
            tlsctl_h_write = PyObject_Hash(tlsctl_s_write);
            tlsctl_h_real = PyObject_Hash(tlsctl_s_real);
            tlsctl_h_read = PyObject_Hash(tlsctl_s_read);
            tlsctl_h_do_handshake = PyObject_Hash(tlsctl_s_do_handshake);
            tlsctl_fw_type = (PyTypeObject *)PyType_FromSpec(&tlsctl_fw_spec);
        }
        if (tlsctl_fw_type == NULL)
            ok = 0;
    }
    if (ok) {
        Py_IncRef((PyObject *)sslsocket_type);
        Py_XDECREF(tlsctl_sslsocket_type);
        tlsctl_sslsocket_type = (PyObject *)sslsocket_type;
        Py_IncRef((PyObject *)raise_error);
        Py_XDECREF(tlsctl_raise_error);
        tlsctl_raise_error = (PyObject *)raise_error;
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
