/* first_write_cuts.c: the stash filter's partial drain, at the C level.
 *
 * tests/test_c_units.py writes c_source() of src/_tlsctl_build.py (every
 * hand-written C file of tlsctl behind its #line marker) to c_source.c,
 * builds this program against it and runs it:
 *
 *     first_write_cuts LIBSSL CERT_CHAIN_PEM KEY_PEM
 *
 * It binds tlsctl with tlsctl_bind() to LIBSSL (the library the module
 * bound to in the test's interpreter), then runs real TLS 1.3 handshakes
 * between a server SSL whose transport is one half of an OpenSSL BIO pair
 * and a client on memory BIOs.  The BIO pair is the cut: before the
 * server's first write, filler bytes leave exactly CUT bytes free in it,
 * so the stash's one write of "held tickets + first record" is taken up
 * to CUT bytes; after that the pair has STEP bytes free at each retry, so
 * the rest drains in many partial writes.  Every CUT from 0 to the whole
 * flight is tried, for both ways tickets reach the stash:
 *
 *   stash    tlsctl_stash_install() (the 1.1.1 mechanism): the handshake's
 *            own tickets, captured at the client's Finished;
 *   capture  tlsctl_capture() (native defer on a socket): tickets queued
 *            by SSL_new_session_ticket() after the handshake (OpenSSL 3.x).
 *
 * For each: nothing leaves before the first write; the first write offers
 * the tickets and the whole record to the transport in ONE write call (a
 * BIO callback logs the pair's writes), which takes exactly CUT bytes of
 * it; no byte is lost, doubled or reordered (the client decrypts every
 * ticket and the data: one wrong byte fails a record's MAC); the stash
 * counts every ticket released; the filter leaves the chain afterwards and
 * later records go straight to the transport.  One line per mode on
 * success ("stash: N cuts, T tickets each"), a message and exit status 1
 * on the first failure.
 *
 * Then kTLS (10.), which this machine's kernel may lack: OpenSSL's "does
 * the kernel encrypt?" (asked before each record) stops at the filter, as
 * does a request to start kTLS, and tlsctl_capture() does not stand in
 * front of a transport that says its kernel encrypts (one line, "ktls:").
 */

#include <Python.h>

#include "c_source.c"

typedef long (*write_log_fn)(BIO *, int, const char *, size_t, int, long, int,
                             size_t *);

/* OpenSSL functions only this program needs (tlsctl's table has the
 * rest), bound from the same handle. */
#define X_FUNCTIONS(X)                                                         \
    X(SSL_CTX *, SSL_CTX_new, (const SSL_METHOD *))                            \
    X(int, SSL_CTX_use_certificate_chain_file, (SSL_CTX *, const char *))      \
    X(int, SSL_CTX_use_PrivateKey_file, (SSL_CTX *, const char *, int))        \
    X(long, SSL_CTX_ctrl, (SSL_CTX *, int, long, void *))                      \
    X(void, SSL_CTX_sess_set_new_cb,                                           \
      (SSL_CTX *, int (*)(SSL *, SSL_SESSION *)))                              \
    X(SSL *, SSL_new, (SSL_CTX *))                                             \
    X(void, SSL_free, (SSL *))                                                 \
    X(void, SSL_set_bio, (SSL *, BIO *, BIO *))                                \
    X(void, SSL_set_accept_state, (SSL *))                                     \
    X(void, SSL_set_connect_state, (SSL *))                                    \
    X(int, SSL_do_handshake, (SSL *))                                          \
    X(int, SSL_write, (SSL *, const void *, int))                              \
    X(int, SSL_read, (SSL *, void *, int))                                     \
    X(int, SSL_get_error, (const SSL *, int))                                  \
    X(int, BIO_new_bio_pair, (BIO **, size_t, BIO **, size_t))                 \
    X(const BIO_METHOD *, BIO_s_mem, (void))                                   \
    X(int, BIO_free, (BIO *))                                                  \
    X(void, BIO_set_callback_ex, (BIO *, write_log_fn))

#define X_POINTER(ret, name, params) static ret(*x_##name) params;
X_FUNCTIONS(X_POINTER)
#define X_ROW(ret, name, params) {#name, (void **)&x_##name},
static const struct {
    const char *name;
    void **slot;
} x_syms[] = {X_FUNCTIONS(X_ROW){NULL, NULL}};

/* <openssl/ssl.h> values (tests/test_c_units.py compares them with the
 * real headers when those are installed). */
#define X_SSL_FILETYPE_PEM             1
#define X_SSL_CTRL_SET_SESS_CACHE_MODE 44
#define X_SSL_SESS_CACHE_CLIENT        1
#define X_SSL_ERROR_WANT_WRITE         3
#define X_BIO_CTRL_PENDING             10
#define X_BIO_CB_WRITE                 3
#define X_BIO_CB_CTRL                  6
#define X_BIO_CB_RETURN                128

#define PAIR_SIZE  4096 /* each direction of the BIO pair */
#define FILLER     0x5a
#define MAX_ROUNDS 64   /* of a handshake */
#define STEP       7    /* bytes free in the pair at each retry */
#define MAX_RETRY  4096 /* SSL_write retries of one first write */
/* OpenSSL's default count, and another for the capture mode, so that
 * each mode's count is checked against the records actually held. */
#define STASH_TICKETS   2
#define CAPTURE_TICKETS 3

static const char message[] = "the first response";
static int tickets_seen;

/* The write calls the server's transport saw since the last reset. */
static struct {
    int calls;
    size_t first_len, first_taken;
} writes;

static long log_write(BIO *b, int oper, const char *argp, size_t len, int argi,
                      long argl, int ret, size_t *processed)
{
    (void)b;
    (void)argp;
    (void)argi;
    (void)argl;
    if (oper == X_BIO_CB_WRITE && writes.calls++ == 0)
        writes.first_len = len;
    else if (oper == (X_BIO_CB_WRITE | X_BIO_CB_RETURN) && writes.calls == 1)
        writes.first_taken = ret > 0 && processed != NULL ? *processed : 0;
    return ret;
}

static int fail(const char *mode, int cut, const char *what)
{
    fprintf(stderr, "%s, cut %d: %s\n", mode, cut, what);
    return 0;
}

static int count_ticket(SSL *ssl, SSL_SESSION *session)
{
    (void)ssl;
    (void)session;
    tickets_seen++;
    return 0; /* not kept: OpenSSL frees the session */
}

typedef struct {
    SSL *server, *client;
    BIO *pair_server, *pair_peer; /* the server's transport, its far end */
    BIO *client_in, *client_out;
} conn;

static void conn_free(conn *c)
{
    if (c->server != NULL)
        x_SSL_free(c->server); /* frees the pair half and the stash */
    if (c->client != NULL)
        x_SSL_free(c->client); /* frees client_in and client_out */
    if (c->pair_peer != NULL)
        x_BIO_free(c->pair_peer);
    memset(c, 0, sizeof(*c));
}

/* Move whatever is in flight: server -> client, client -> server.
 * skip: bytes to read from the server's side first and check as filler.
 * Returns the bytes moved, or -1 when the filler is not what was put. */
static int pump(conn *c, int *skip)
{
    unsigned char buf[PAIR_SIZE];
    int n, i, moved = 0;
    while ((n = p_BIO_read(c->pair_peer, (char *)buf, sizeof(buf))) > 0) {
        i = 0;
        for (; i < n && (*skip) > 0; i++, (*skip)--)
            if (buf[i] != FILLER)
                return -1;
        if (i < n)
            p_BIO_write(c->client_in, (char *)buf + i, n - i);
        moved += n;
    }
    while ((n = p_BIO_read(c->client_out, (char *)buf, sizeof(buf))) > 0) {
        if (p_BIO_write(c->pair_peer, (char *)buf, n) != n)
            return -1; /* the pair holds PAIR_SIZE: never short here */
        moved += n;
    }
    return moved;
}

/* Fill the (drained) pair with filler until only `room` bytes are free;
 * *skip counts the filler for pump() to check and drop. */
static int fill(conn *c, int room, int *skip)
{
    char filler[PAIR_SIZE];
    int n = PAIR_SIZE - room;
    if (n <= 0)
        return 1;
    memset(filler, FILLER, (size_t)n);
    if (p_BIO_write(c->pair_server, filler, n) != n)
        return 0;
    *skip += n;
    return 1;
}

static int conn_new(conn *c, SSL_CTX *sctx, SSL_CTX *cctx)
{
    BIO *in = NULL, *out = NULL;
    memset(c, 0, sizeof(*c));
    if ((c->server = x_SSL_new(sctx)) == NULL ||
        (c->client = x_SSL_new(cctx)) == NULL ||
        !x_BIO_new_bio_pair(&c->pair_server, PAIR_SIZE, &c->pair_peer,
                            PAIR_SIZE) ||
        (in = p_BIO_new(x_BIO_s_mem())) == NULL ||
        (out = p_BIO_new(x_BIO_s_mem())) == NULL) {
        if (in != NULL)
            x_BIO_free(in);
        if (c->pair_server != NULL)
            x_BIO_free(c->pair_server);
        return 0;
    }
    /* One reference for both roles, as SSL_set_fd() gives a socket BIO. */
    x_SSL_set_bio(c->server, c->pair_server, c->pair_server);
    x_SSL_set_bio(c->client, in, out);
    c->client_in = in;
    c->client_out = out;
    x_SSL_set_accept_state(c->server);
    x_SSL_set_connect_state(c->client);
    return 1;
}

static int handshake(conn *c)
{
    int round, skip = 0, cdone = 0, sdone = 0;
    for (round = 0; round < MAX_ROUNDS && !(cdone && sdone); round++) {
        cdone = cdone || x_SSL_do_handshake(c->client) == 1;
        sdone = sdone || x_SSL_do_handshake(c->server) == 1;
        if (pump(c, &skip) < 0)
            return 0;
    }
    return cdone && sdone && p_SSL_version(c->server) == TLS1_3_VERSION;
}

enum mode { MODE_STASH, MODE_CAPTURE };
static const char *const mode_names[] = {"stash", "capture"};

/* The tickets into the stash, by mode; returns the bytes held, or -1. */
static int hold_tickets(conn *c, enum mode mode)
{
    size_t held, released;
    int i;
    if (mode == MODE_CAPTURE) {
        for (i = 0; i < CAPTURE_TICKETS; i++)
            if (p_SSL_new_session_ticket(c->server) != 1)
                return -1;
        if (tlsctl_capture(c->server, 1) != 1 ||
            x_SSL_do_handshake(c->server) != 1 ||
            tlsctl_capture(c->server, 0) != 1)
            return -1;
    }
    if (!tlsctl_stash_state(c->server, &held, &released) || released != 0)
        return -1;
    return held > 0 ? (int)held : -1;
}

/* The first write of c, cut at `cut` bytes, then STEP bytes per retry:
 * the bytes of the flight (tickets + record), or 0 on failure (reported). */
static int first_write(conn *c, const char *name, int cut, int held)
{
    int r, skip = 0, rounds, flight;
    /* held tickets + the first record: the TLS 1.3 record of message is
     * 5 header + data + 1 content type + 16 tag bytes. */
    flight = held + 5 + (int)sizeof(message) + 1 + 16;
    if (!fill(c, cut, &skip))
        return fail(name, cut, "could not fill the pair");
    memset(&writes, 0, sizeof(writes));
    x_BIO_set_callback_ex(c->pair_server, log_write);
    r = x_SSL_write(c->server, message, (int)sizeof(message));
    if (writes.calls < 1 || writes.first_len != (size_t)flight)
        return fail(name, cut, "tickets and record not offered in one write");
    if (writes.first_taken != (size_t)(cut < flight ? cut : flight))
        return fail(name, cut, "the transport took other than the cut");
    if (cut >= flight && (writes.calls != 1 || r != (int)sizeof(message)))
        return fail(name, cut, "room for all, yet not one complete write");
    for (rounds = 0; r <= 0 && rounds < MAX_RETRY; rounds++) {
        if (x_SSL_get_error(c->server, r) != X_SSL_ERROR_WANT_WRITE)
            return fail(name, cut, "SSL_write failed instead of a retry");
        if (pump(c, &skip) < 0 || !fill(c, STEP, &skip))
            return fail(name, cut, "the filler came back changed");
        r = x_SSL_write(c->server, message, (int)sizeof(message));
    }
    x_BIO_set_callback_ex(c->pair_server, NULL);
    if (r != (int)sizeof(message))
        return fail(name, cut, "SSL_write did not complete on retry");
    if (pump(c, &skip) < 0 || skip != 0)
        return fail(name, cut, "the filler came back changed");
    return flight;
}

/* One connection whose first write is cut at `cut`; raises *flight to its
 * flight's size.  1, or 0 on failure (reported). */
static int run_cut(SSL_CTX *sctx, SSL_CTX *cctx, enum mode mode, int cut,
                   int *flight)
{
    const char *name = mode_names[mode];
    char got[sizeof(message)];
    conn c;
    int expected = mode == MODE_CAPTURE ? CAPTURE_TICKETS : STASH_TICKETS;
    int held, this_flight, skip = 0, ok = 0;
    size_t still_held, released;

    tickets_seen = 0;
    if (!conn_new(&c, sctx, cctx))
        return fail(name, cut, "could not set up the connection");
    if (mode == MODE_CAPTURE)
        p_SSL_set_num_tickets(c.server, 0);
    else if (tlsctl_stash_install(c.server) != 1) {
        fail(name, cut, "tlsctl_stash_install() refused");
        goto done;
    }
    if (!handshake(&c)) {
        fail(name, cut, "the TLS 1.3 handshake did not complete");
        goto done;
    }
    if ((held = hold_tickets(&c, mode)) < 0) {
        fail(name, cut, "no tickets held after the handshake");
        goto done;
    }
    if (p_BIO_ctrl(c.pair_peer, X_BIO_CTRL_PENDING, 0, NULL) != 0) {
        fail(name, cut, "a ticket went out before the data");
        goto done;
    }
    if ((this_flight = first_write(&c, name, cut, held)) == 0)
        goto done;
    if (x_SSL_read(c.client, got, (int)sizeof(got)) != (int)sizeof(got) ||
        memcmp(got, message, sizeof(got)) != 0) {
        fail(name, cut, "the client did not read the data intact");
        goto done;
    }
    if (tickets_seen != expected) {
        fail(name, cut, "the client did not get every ticket, once");
        goto done;
    }
    if (!tlsctl_stash_state(c.server, &still_held, &released) ||
        still_held != 0 || released != (size_t)expected) {
        fail(name, cut, "the stash does not count every ticket released");
        goto done;
    }
    if (tlsctl_stash_remove(c.server) != 1 ||
        p_SSL_get_wbio(c.server) != c.pair_server) {
        fail(name, cut, "the stash is still in the write chain");
        goto done;
    }
    /* After the filter: straight to the transport, still in order. */
    if (x_SSL_write(c.server, message, (int)sizeof(message)) !=
            (int)sizeof(message) ||
        pump(&c, &skip) <= 0 ||
        x_SSL_read(c.client, got, (int)sizeof(got)) != (int)sizeof(got) ||
        memcmp(got, message, sizeof(got)) != 0) {
        fail(name, cut, "a write after the filter's removal was not read back");
        goto done;
    }
    if (*flight == INT_MAX || this_flight > *flight)
        *flight = this_flight;
    ok = 1;
done:
    conn_free(&c);
    return ok;
}

/* ---- kTLS ----------------------------------------------------------- */

static struct {
    BIO *filter; /* the stash filter in front of the transport */
    int asked;   /* "does the kernel encrypt?" put to the filter */
    int passed;  /* kTLS controls that reached the transport */
    int claim;   /* the transport answers "yes, the kernel encrypts" */
} ktls;

/* On the filter and on the transport behind it.  For a control, argi is
 * its command; the value returned after the call (BIO_CB_RETURN) is what
 * BIO_ctrl returns. */
static long watch_ktls(BIO *b, int oper, const char *argp, size_t len, int argi,
                       long argl, int ret, size_t *processed)
{
    (void)argp;
    (void)len;
    (void)argl;
    (void)processed;
    if ((oper & ~X_BIO_CB_RETURN) != X_BIO_CB_CTRL ||
        (argi != BIO_CTRL_GET_KTLS_SEND && argi != TLSCTL_BIO_CTRL_SET_KTLS))
        return ret;
    if (b == ktls.filter) {
        if (oper == X_BIO_CB_CTRL && argi == BIO_CTRL_GET_KTLS_SEND)
            ktls.asked++;
    } else if (oper == X_BIO_CB_CTRL) {
        ktls.passed++;
    } else if (ktls.claim && argi == BIO_CTRL_GET_KTLS_SEND) {
        return 1;
    }
    return ret;
}

/* The kTLS checks; 1, or 0 on failure (reported). */
static int check_ktls(SSL_CTX *sctx, SSL_CTX *cctx)
{
    conn c;
    BIO *filter;
    int skip = 0, r, asked, ok = 0;

    memset(&ktls, 0, sizeof(ktls));
    if (!conn_new(&c, sctx, cctx))
        return fail("ktls", 0, "could not set up the connection");
    x_BIO_set_callback_ex(c.pair_server, watch_ktls);
    if (tlsctl_stash_install(c.server) != 1 ||
        (filter = p_SSL_get_wbio(c.server)) == c.pair_server) {
        fail("ktls", 0, "tlsctl_stash_install() refused");
        goto done;
    }
    ktls.filter = filter;
    x_BIO_set_callback_ex(filter, watch_ktls);
    if (!handshake(&c) ||
        x_SSL_write(c.server, message, (int)sizeof(message)) !=
            (int)sizeof(message) ||
        pump(&c, &skip) <= 0) {
        fail("ktls", 0, "the stash connection did not write");
        goto done;
    }
    asked = ktls.asked; /* OpenSSL's own questions, before the test's */
    if (p_BIO_ctrl(filter, TLSCTL_BIO_CTRL_SET_KTLS, 1, NULL) != 0) {
        fail("ktls", 0, "the filter let kTLS start behind it");
        goto done;
    }
    /* Asked directly, while the transport would say "yes": the filter's
     * own answer (on every OpenSSL, whether or not it asks by itself). */
    ktls.claim = 1;
    r = (int)p_BIO_ctrl(filter, BIO_CTRL_GET_KTLS_SEND, 0, NULL);
    ktls.claim = 0;
    if (r != 0) {
        fail("ktls", 0, "the filter passed on the kTLS question");
        goto done;
    }
    if (ktls.passed != 0) {
        fail("ktls", 0, "a kTLS control went past the filter");
        goto done;
    }
    conn_free(&c);
    ktls.filter = NULL; /* freed with it: its address may come back */

    if (!conn_new(&c, sctx, cctx))
        return fail("ktls", 1, "could not set up the connection");
    p_SSL_set_num_tickets(c.server, 0);
    if (!handshake(&c)) {
        fail("ktls", 1, "the TLS 1.3 handshake did not complete");
        goto done;
    }
    x_BIO_set_callback_ex(c.pair_server, watch_ktls);
    ktls.claim = 1;
    r = tlsctl_capture(c.server, 1);
    ktls.claim = 0;
    if (r != 0 || p_SSL_get_wbio(c.server) != c.pair_server) {
        fail("ktls", 1, "capture stood in front of a kTLS transport");
        goto done;
    }
    printf("ktls: %d questions stopped at the filter, kTLS refused behind "
           "it; no capture over kTLS\n",
           asked);
    ok = 1;
done:
    conn_free(&c);
    return ok;
}

static int bind_extra(const char *libssl)
{
    void *handle = dlopen(libssl, RTLD_NOW | RTLD_NOLOAD);
    int i;
    if (handle == NULL)
        return 0;
    for (i = 0; x_syms[i].name != NULL; i++)
        if ((*x_syms[i].slot = dlsym(handle, x_syms[i].name)) == NULL)
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    char err[512];
    SSL_CTX *sctx, *cctx;
    int mode, cut, flight, cuts, status = 0;

    if (argc != 4) {
        fprintf(stderr, "usage: %s LIBSSL CERT_CHAIN_PEM KEY_PEM\n", argv[0]);
        return 2;
    }
    /* What _ssl does for the module: the library is loaded; tlsctl_bind
     * then proves and binds it (RTLD_NOLOAD). */
    if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == NULL) {
        fprintf(stderr, "dlopen(%s): %s\n", argv[1], dlerror());
        return 1;
    }
    if (tlsctl_bind(argv[1], err, sizeof(err)) != 0) {
        fprintf(stderr, "tlsctl_bind: %s\n", err);
        return 1;
    }
    if (!bind_extra(argv[1])) {
        fprintf(stderr, "%s lacks a function this program uses\n", argv[1]);
        return 1;
    }
    sctx = x_SSL_CTX_new(p_TLS_server_method());
    cctx = x_SSL_CTX_new(p_TLS_client_method());
    if (sctx == NULL || cctx == NULL ||
        x_SSL_CTX_use_certificate_chain_file(sctx, argv[2]) != 1 ||
        x_SSL_CTX_use_PrivateKey_file(sctx, argv[3], X_SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "could not set up the contexts\n");
        return 1;
    }
    x_SSL_CTX_ctrl(cctx, X_SSL_CTRL_SET_SESS_CACHE_MODE,
                   X_SSL_SESS_CACHE_CLIENT, NULL);
    x_SSL_CTX_sess_set_new_cb(cctx, count_ticket);

    for (mode = MODE_STASH; status == 0 && mode <= MODE_CAPTURE; mode++) {
        if (mode == MODE_CAPTURE &&
            !tlsctl_has_symbol("SSL_new_session_ticket")) {
            printf("capture: no SSL_new_session_ticket (OpenSSL 1.1.1)\n");
            continue;
        }
        /* Up to the longest flight seen: a ticket is a few bytes shorter
         * now and then (a random field that encodes shorter). */
        flight = INT_MAX;
        for (cut = 0, cuts = 0; status == 0 && cut <= flight; cut++, cuts++)
            if (!run_cut(sctx, cctx, (enum mode)mode, cut, &flight))
                status = 1;
        if (status == 0)
            printf("%s: %d cuts, %d tickets each\n", mode_names[mode], cuts,
                   mode == MODE_CAPTURE ? CAPTURE_TICKETS : STASH_TICKETS);
    }
    if (status == 0 && !check_ktls(sctx, cctx))
        status = 1;
    p_SSL_CTX_free(sctx);
    p_SSL_CTX_free(cctx);
    return status;
}
