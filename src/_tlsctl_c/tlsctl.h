/* tlsctl.h: shared by the files of tlsctl's C module (see the layout
 * note at the end of this comment).  Not a public header: the module's
 * API is its cdef in src/_tlsctl_build.py. */
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
 *    renew_on_resume=False and on_resume (see 8.).  Without a Python
 *    callback it maps OpenSSL's status to the decision OpenSSL makes without
 *    a callback; renew_on_resume=False then turns USE_RENEW into USE, so a
 *    decrypted ticket resumes WITHOUT a renewal ticket.
 *
 * 6. tlsctl_queue_tickets (bind.c): one C call per connection for the hot
 *    decision "is this a finished TLS 1.3 server handshake, was it resumed,
 *    queue N tickets", so the first application write pays one crossing.
 *
 * 7. The stash (OpenSSL 1.1.1 has no SSL_new_session_ticket).  OpenSSL makes
 *    and writes its tickets as usual; a filter BIO holds the bytes back:
 *
 *    - tlsctl_stash_install(), called by the plan (apply, 9.) for each new
 *      server connection BEFORE its handshake, puts the "tlsctl
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
 *    - tlsctl_stash_remove(), called by the proxy (9.) right after the first
 *      application write returns (between OpenSSL calls, never from inside
 *      a BIO or info callback), takes the filter out of the chain once it
 *      holds nothing: from then on records go straight to the transport.
 *
 * 8. Per-context state, ticket callbacks and shared ticket keys.
 *    - Each SSL_CTX we configure carries a tlsctl_ctx_ext in ex_data under
 *      OUR OWN index (Python's _ssl owns SSL ex_data index 0, the app data;
 *      we never read or write it).  The ex_data free function cleanses the
 *      keys and frees the struct when OpenSSL frees the SSL_CTX, so its
 *      lifetime is exactly the SSL_CTX's.
 *    - Python callbacks: the ext holds a strong reference to a WEAK
 *      reference to the Python-side holder of the user's callables, which
 *      lives as an attribute of the ssl.SSLContext.  So the callables (and
 *      whatever they capture) live exactly as long as the SSLContext, and a
 *      cycle through them stays visible to Python's garbage collector.
 *      OpenSSL calls us with the GIL released (_ssl releases it around
 *      SSL_do_handshake / SSL_read / SSL_write); every touch of a Python
 *      object takes it with PyGILState_Ensure, including from cffi-called
 *      functions (cffi releases the GIL around them too).
 *    - Each server connection set up on such a context carries a Python
 *      record (_policy._CallbackRecord: the ssl.SSLSocket / ssl.SSLObject,
 *      weakly, and a slot for an exception) in SSL ex_data under our own
 *      index (tlsctl_rec_idx), with a strong reference released by the
 *      ex_data free function.  The single Python dispatcher is called with
 *      that record: it calls the user's callable, and keeps any exception
 *      in the record for the first-write proxy (9.) to re-raise after the
 *      OpenSSL call returns (pyOpenSSL's pattern); here we only see a
 *      decision or a failure.  Python never unwinds through OpenSSL's
 *      stack frames.
 *    - Shared ticket keys: the ticket key callback (EVP_MAC form on 3.x,
 *      legacy HMAC_CTX form on 1.1.1) looks keys up in C, under a mutex (a
 *      rotation may run in another thread while handshakes run without the
 *      GIL): no Python call per handshake.  Key name 16 bytes; 80-byte keys
 *      are AES-256-CBC + HMAC-SHA256 with a 32-byte secret, nginx's 48-byte
 *      keys AES-128-CBC + HMAC-SHA256 with a 16-byte secret.  The first key
 *      encrypts; a ticket under any listed key decrypts; decrypting with a
 *      non-first key asks OpenSSL for a renewal (return 2), and on TLS 1.3
 *      so does the first, as OpenSSL's built-in keys do.  An unknown name
 *      returns 0: a full handshake.  Key copies on the stack and replaced or
 *      freed key arrays are wiped with OPENSSL_cleanse.  The callback finds
 *      the keys through SSL_get_SSL_CTX(s): a connection moved to another
 *      context by an SNI callback uses that context's keys.
 *
 * 9. The per-connection path (proxy.c, apply.c): one path for every server
 *    connection of a configured context (every policy, the stash, ticket
 *    callbacks) and for issue_tickets().  A Python version cost several per
 *    cent of a handshake (docs/performance.md, "Behind the design").
 *    - tlsctl_fast_init(), once at binding, creates the FirstWriteProxy
 *      type (PyType_FromSpec, stable ABI) and the builtins arm, make_apply,
 *      report and quiet, and hands them to Python in a dict (passed by id(), as
 *      every object in 3.; the caller keeps it alive).  These are ordinary
 *      Python-callable C functions: the GIL is held, unlike in the cffi
 *      functions above.
 *    - make_apply() returns a context's plan: the function _wrap's hooks
 *      call with each new server connection, before its handshake.  It
 *      proves the connection's SSL (2.), records the policy in the SSL's
 *      ex_data (a tagged integer, see TLSCTL_IS_COUNT: no allocation,
 *      nothing to free), sets the connection's own num_tickets (0 for
 *      defer and suppress: the context's value stays the user's knob),
 *      installs the stash (7.) or TCP_QUICKACK (10.), registers the
 *      callback record (8.) and, for "defer" or a context with callbacks,
 *      sets conn._sslobj to a FirstWriteProxy.
 *    - The proxy's state is a TLSCTL_STATE_*: DUE (tickets go with the
 *      next write) -> FLUSHING (queued; a socket took part of them) ->
 *      GUARDED (nothing due; callbacks may still run) -> STOCK (the real
 *      object is back on the owner, _ssl._SSLSocket.owner, so later calls
 *      are stock).  issue_tickets() makes any state DUE again.  The proxy
 *      forwards every attribute to the real _ssl._SSLSocket except write
 *      (and _real; and do_handshake and read when the connection has a
 *      callback record, to re-raise a callback's exception).  On an
 *      exception it stays, for the retry.  It holds no reference to the
 *      connection: no cycle.  After a handshake that ended in TLS 1.2 it
 *      steps aside at the first look (nothing to hold), unless callbacks
 *      may run again (renegotiation).
 *
 * 10. What deferring costs on the wire (stash.c).  A TLS 1.3 server that
 *    sends nothing after the client's Finished leaves that Finished
 *    unacknowledged, and a client that keeps Nagle on (no TCP_NODELAY)
 *    holds its first request until the kernel's delayed ACK, ~40 ms later;
 *    stock tickets carried that ACK.  tlsctl_quickack sets TCP_QUICKACK on
 *    the socket when the handshake is done (an info callback on connections
 *    that send no ticket in their handshake, or at once when the handshake
 *    already ran), and Linux sends the pending ACK immediately.  Memory
 *    BIOs have no descriptor: _quickack hooks asyncio's and trio's own
 *    handshake completion instead, and asks quiet() (apply.c) whether the
 *    connection needs the option.  And the first write's tickets go out
 *    in the SAME write() as its data: tlsctl_capture makes the stash filter
 *    hold the ticket records the handshake driver writes (a captured write
 *    always succeeds, so a socket can never be left with half a ticket
 *    record, which SSL_write's retry would reject with BAD_LENGTH) and the
 *    data record takes them along.
 *
 * Layout: this header, then bind.c (1.-6.), stash.c (7., 10.), tickets.c
 * and keys.c (8.), proxy.c and apply.c (9.), spliced in that order (after
 * the generated pointer table) into ONE translation unit by
 * src/_tlsctl_build.py, with #line markers, so static functions of an
 * earlier file are visible to the later ones.
 */

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <limits.h>
#include <time.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define TLSCTL_KIND_UNKNOWN 0
#define TLSCTL_KIND_GENERIC 1
#define TLSCTL_KIND_SERVER  2
#define TLSCTL_KIND_CLIENT  3

#define TLSCTL_ERR_NOT_BOUND (-1)
#define TLSCTL_ERR_HANDSHAKE (-2)
#define TLSCTL_ERR_NO_NATIVE (-3)
#define TLSCTL_ERR_OPENSSL   (-4)
#define TLSCTL_ERR_CLIENT    (-5)
#define TLSCTL_ERR_NOT_TLS13 (-6)
#define TLSCTL_ERR_CLOSED    (-9)

/* At most this many tickets wait for one write (patch()'s count, plus
 * issue_tickets()): a client keeps a few (one per parallel connection it
 * may open); more only make the first write slow. */
#define TLSCTL_MAX_TICKETS 16

/* OpenSSL's BIO_CTRL_SET_KTLS: in its internal headers only; the public
 * <openssl/bio.h> of 3.x names the number in a comment (tests/test_build). */
#define TLSCTL_BIO_CTRL_SET_KTLS 72

#define TLSCTL_RENEW_STOCK 0
#define TLSCTL_RENEW_NEVER 1

/* A connection's policy, as make_apply() takes it and the SSL's ex_data
 * records it (see 9.). */
#define TLSCTL_POLICY_NONE      0
#define TLSCTL_POLICY_DEFER     1
#define TLSCTL_POLICY_SUPPRESS  2
#define TLSCTL_POLICY_IMMEDIATE 3

/* Where a connection stands on the first-write path (proxy.c, see 9.).
 * Python takes the names from these constants (tlsctl._policy.STATES). */
/* GUARDED: nothing due; a ticket callback may still run, and its
 * exception is re-raised. */
#define TLSCTL_STATE_STOCK    0 /* no proxy: the stock _ssl._SSLSocket */
#define TLSCTL_STATE_DUE      1 /* tickets go out with the next write */
#define TLSCTL_STATE_FLUSHING 2 /* tickets queued, not yet all written */
#define TLSCTL_STATE_GUARDED  3

/* tickets.c: whether OpenSSL would send tickets after this handshake. */
static int tlsctl_ticket_expected(const SSL *s);

/* Mirrors of the leading fields of CPython's _ssl objects (see 3.). */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} tlsctl_py_sslcontext;
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
} tlsctl_py_sslsocket;
