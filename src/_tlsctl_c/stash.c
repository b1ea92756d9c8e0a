/* stash.c: the stash filter BIO (7.), the first write's capture and
 * TCP_QUICKACK (10.). */

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

/* Room for len more bytes behind the held ones (exact: no more, for a
 * record copied there for one write); 0 when out of memory. */
static int tlsctl_stash_reserve(tlsctl_stash *st, size_t len, int exact)
{
    size_t need, cap;
    unsigned char *grown;
    if (len > SIZE_MAX / 2 - st->held_len)
        return 0;
    need = st->held_len + len;
    if (need <= st->held_cap)
        return 1;
    cap = exact ? need : need * 2;
    if ((grown = realloc(st->held, cap)) == NULL)
        return 0;
    st->held = grown;
    st->held_cap = cap;
    return 1;
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
        if (!tlsctl_stash_reserve(st, (size_t)len, 0))
            return -1;
        memcpy(st->held + st->held_len, data, (size_t)len);
        st->held_len += (size_t)len;
        return len;
    }
    if (st->held_off < st->held_len && len > 0) {
        /* Release: the held records and this one in ONE write, so a peer
         * that is gone cannot reset the connection between them.  The
         * record is copied behind the held ones for the write only: held
         * stays what it was (OpenSSL retries a record that did not go). */
        size_t rem = st->held_len - st->held_off;
        if (rem + (size_t)len > 0x7fffffff ||
            !tlsctl_stash_reserve(st, (size_t)len, 1))
            return -1;
        memcpy(st->held + st->held_len, data, (size_t)len);
        n = p_BIO_write(next, st->held + st->held_off,
                        (int)(rem + (size_t)len));
        p_BIO_copy_next_retry(b);
        if (n <= 0)
            return n;
        st->held_off += (size_t)n < rem ? (size_t)n : rem;
        if (st->held_off == st->held_len) {
            st->released_records +=
                tlsctl_count_records(st->held, st->held_len);
            tlsctl_stash_drop(st);
        }
        if ((size_t)n <= rem) { /* none of this record went out: retry it */
            p_BIO_clear_flags(b, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY);
            p_BIO_set_flags(b, BIO_FLAGS_WRITE | BIO_FLAGS_SHOULD_RETRY);
            return -1;
        }
        return n - (int)rem; /* this record: all or part, like any BIO */
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

/* kTLS (see 10.): the filter never stands in front of a socket that
 * encrypts in the kernel (tlsctl_capture refuses one; the stash goes in
 * before the handshake has any key to hand over) and refuses to let one
 * start behind it (OpenSSL then encrypts itself, as it does when
 * the kernel lacks kTLS), so OpenSSL's question before every record, "does
 * the kernel encrypt?", has a known answer: no.  Records it encrypted
 * itself are what the filter may hold and join; kTLS ones would not be. */
static long tlsctl_stash_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    BIO *next;
    long ret;
    if (cmd == BIO_CTRL_GET_KTLS_SEND || cmd == TLSCTL_BIO_CTRL_SET_KTLS ||
        (next = p_BIO_next(b)) == NULL)
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
    if (!tlsctl_bound || p_SSL_get_info_callback(ssl) != NULL ||
        p_SSL_CTX_get_info_callback(p_SSL_get_SSL_CTX(ssl)) != NULL ||
        (w = p_SSL_get_wbio(ssl)) == NULL ||
        p_BIO_method_type(w) == BIO_TYPE_MEM)
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
        tlsctl_quickack(s); /* the stash holds the tickets back too */
    if (where == SSL_CB_ACCEPT_LOOP) {
        /* "TRFIN" is TLS_ST_SR_FINISHED, whose enum VALUE differs between
         * versions (32 in 1.1.1 and 3.0, 36 in 3.5); the string does not. */
        if (p_SSL_version(s) == TLS1_3_VERSION &&
            strcmp(p_SSL_state_string(s), "TRFIN") == 0 &&
            (st = tlsctl_stash_of(s)) != NULL)
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
    return p_BIO_meth_set_write(tlsctl_stash_method, tlsctl_stash_write) &&
           p_BIO_meth_set_read(tlsctl_stash_method, tlsctl_stash_read) &&
           p_BIO_meth_set_ctrl(tlsctl_stash_method, tlsctl_stash_ctrl) &&
           p_BIO_meth_set_create(tlsctl_stash_method, tlsctl_stash_create) &&
           p_BIO_meth_set_destroy(tlsctl_stash_method, tlsctl_stash_destroy);
}

/* Put a stash filter in front of ssl's write BIO; returns its state, or
 * NULL when OpenSSL failed. */
static tlsctl_stash *tlsctl_stash_push(SSL *ssl)
{
    BIO *w, *f;
    if (!tlsctl_stash_init() || (w = p_SSL_get_wbio(ssl)) == NULL ||
        (f = p_BIO_new(tlsctl_stash_method)) == NULL)
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
 * in the same buffer) or on a socket with kTLS sending (the kernel makes
 * the records: nothing to join; the writes stay apart, as stock's), or
 * TLSCTL_ERR_OPENSSL. */
static int tlsctl_capture(SSL *ssl, int on)
{
    tlsctl_stash *st;
    BIO *w;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if ((st = tlsctl_stash_of(ssl)) == NULL) {
        if (!on)
            return 1;
        if ((w = p_SSL_get_wbio(ssl)) == NULL ||
            p_BIO_method_type(w) == BIO_TYPE_MEM ||
            p_BIO_ctrl(w, BIO_CTRL_GET_KTLS_SEND, 0, NULL) > 0)
            return 0; /* the writes stay apart, as stock's */
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
    if (!tlsctl_bound || (f = p_SSL_get_wbio(ssl)) == NULL ||
        p_BIO_method_type(f) != tlsctl_stash_type)
        return 1;
    st = p_BIO_get_data(f);
    if (st == NULL || st->capturing || st->held_off < st->held_len ||
        !p_SSL_is_init_finished(ssl) || (next = p_BIO_next(f)) == NULL)
        return 0;
    /* SSL_set0_wbio frees the chain f -> next: our new reference keeps
     * next alive as the SSL's own wbio. */
    p_BIO_up_ref(next);
    p_SSL_set0_wbio(ssl, next);
    if (p_SSL_get_info_callback(ssl) == tlsctl_info_cb)
        p_SSL_set_info_callback(ssl, NULL);
    return 1;
}
