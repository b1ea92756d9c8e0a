/* keys.c: shared ticket keys (set_ticket_keys) and their rotation from a
 * master (rotate_ticket_keys), the lifetime, in the per-context state of
 * tickets.c (8.). */

/* ---- shared keys (see 8.) ------------------------------------------ */

static int tlsctl_keys_mode(void)
{
    if (!tlsctl_bound)
        return TLSCTL_KEYS_NONE;
    if (p_SSL_CTX_set_tlsext_ticket_key_evp_cb != NULL &&
        p_EVP_MAC_CTX_set_params != NULL)
        return TLSCTL_KEYS_EVP;
    if (p_HMAC_Init_ex != NULL)
        return TLSCTL_KEYS_LEGACY;
    return TLSCTL_KEYS_NONE;
}

/* The key of connections whose key context has no shared keys (moved to
 * another context before their handshake started): random, made once per
 * process, so such tickets resume within the process, like OpenSSL's own
 * keys.  Never "no ticket": OpenSSL 1.1.1 then sends a malformed TLS 1.3
 * NewSessionTicket (a zero-length ticket; the client fails with
 * LENGTH_MISMATCH, measured on 1.1.1w).  Guarded by tlsctl_exts_lock. */
static tlsctl_key tlsctl_fallback_key;
static int tlsctl_fallback_ready = 0;

static int tlsctl_fallback_pick(const unsigned char *name, int enc,
                                tlsctl_key *out)
{
    int rc = -1;
    pthread_mutex_lock(&tlsctl_exts_lock);
    if (!tlsctl_fallback_ready &&
        p_RAND_bytes(tlsctl_fallback_key.name, TLSCTL_KEY_NAME_LEN) == 1 &&
        p_RAND_bytes(tlsctl_fallback_key.hmac, 32) == 1 &&
        p_RAND_bytes(tlsctl_fallback_key.aes, 32) == 1) {
        tlsctl_fallback_key.size = 80;
        tlsctl_fallback_ready = 1;
    }
    if (tlsctl_fallback_ready) {
        rc = 0;
        if (enc ||
            memcmp(name, tlsctl_fallback_key.name, TLSCTL_KEY_NAME_LEN) == 0) {
            memcpy(out, &tlsctl_fallback_key, sizeof(*out));
            rc = 1;
        }
    }
    pthread_mutex_unlock(&tlsctl_exts_lock);
    return rc;
}

/* Copy the key for this operation out from under the lock.  Returns 1,
 * 0 (decrypt: unknown key name, a full handshake) or -1. */
static int tlsctl_key_pick(SSL *s, const unsigned char *name, int enc,
                           tlsctl_key *out, size_t *index)
{
    tlsctl_ctx_ext *ext = tlsctl_keys_ext_of(s);
    int rc = 0, i = -1, keys = 0;
    if (ext != NULL) {
        pthread_mutex_lock(&ext->lock);
        tlsctl_rotate_locked(ext);
        keys = ext->nkeys > 0;
        i = enc ? (keys ? 0 : -1) : tlsctl_key_find(ext, name);
        if (i >= 0) {
            memcpy(out, &ext->keys[i], sizeof(*out));
            *index = (size_t)i;
            rc = 1;
        }
        pthread_mutex_unlock(&ext->lock);
    }
    if (!keys) {
        *index = 0;
        rc = tlsctl_fallback_pick(name, enc, out);
    }
    return rc;
}

static int tlsctl_key_cb(SSL *s, unsigned char *name, unsigned char *iv,
                         EVP_CIPHER_CTX *cctx, void *hctx, int enc, int evp)
{
    tlsctl_key k;
    size_t index = 0;
    int rc, hlen;
    const EVP_CIPHER *cipher;

    rc = tlsctl_key_pick(s, name, enc, &k, &index);
    if (rc <= 0)
        return rc;
    cipher = k.size == 48 ? p_EVP_aes_128_cbc() : p_EVP_aes_256_cbc();
    hlen = k.size == 48 ? 16 : 32;
    if (enc) {
        memcpy(name, k.name, TLSCTL_KEY_NAME_LEN);
        if (p_RAND_bytes(iv, 16) != 1 ||
            p_EVP_EncryptInit_ex(cctx, cipher, NULL, k.aes, iv) != 1)
            rc = -1;
    } else if (p_EVP_DecryptInit_ex(cctx, cipher, NULL, k.aes, iv) != 1) {
        rc = -1;
    }
    if (rc == 1) {
        if (evp) {
            OSSL_PARAM params[3];
            memset(params, 0, sizeof(params));
            params[0].key = "digest";
            params[0].data_type = OSSL_PARAM_UTF8_STRING;
            params[0].data = (void *)"SHA256";
            params[0].data_size = 6;
            params[0].return_size = (size_t)-1; /* OSSL_PARAM_UNMODIFIED */
            params[1].key = "key";
            params[1].data_type = OSSL_PARAM_OCTET_STRING;
            params[1].data = k.hmac;
            params[1].data_size = (size_t)hlen;
            params[1].return_size = (size_t)-1;
            if (p_EVP_MAC_CTX_set_params((EVP_MAC_CTX *)hctx, params) != 1)
                rc = -1;
        } else if (p_HMAC_Init_ex((HMAC_CTX *)hctx, k.hmac, hlen,
                                  p_EVP_sha256(), NULL) != 1) {
            rc = -1;
        }
    }
    if (rc == 1 && !enc && (index != 0 || p_SSL_version(s) == TLS1_3_VERSION))
        rc = 2; /* renew: under the first key; TLS 1.3 as built-in keys do */
    p_OPENSSL_cleanse(&k, sizeof(k));
    return rc;
}

static int tlsctl_key_evp_cb(SSL *s, unsigned char *name, unsigned char *iv,
                             EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc)
{
    return tlsctl_key_cb(s, name, iv, cctx, hctx, enc, 1);
}

static int tlsctl_key_legacy_cb(SSL *s, unsigned char *name, unsigned char *iv,
                                EVP_CIPHER_CTX *cctx, HMAC_CTX *hctx, int enc)
{
    return tlsctl_key_cb(s, name, iv, cctx, hctx, enc, 0);
}

static int tlsctl_key_ref_cmp(const void *a, const void *b)
{
    return memcmp(((const tlsctl_key_ref *)a)->name,
                  ((const tlsctl_key_ref *)b)->name, TLSCTL_KEY_NAME_LEN);
}

/* The by-name index of n keys, or NULL (out of memory, or a name twice). */
static tlsctl_key_ref *tlsctl_keys_index(const tlsctl_key *keys, size_t n)
{
    tlsctl_key_ref *by_name = calloc(n, sizeof(*by_name));
    size_t i;
    if (by_name == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        memcpy(by_name[i].name, keys[i].name, TLSCTL_KEY_NAME_LEN);
        by_name[i].index = i;
    }
    qsort(by_name, n, sizeof(*by_name), tlsctl_key_ref_cmp);
    for (i = 1; i < n; i++) {
        if (tlsctl_key_ref_cmp(&by_name[i - 1], &by_name[i]) == 0) {
            free(by_name);
            return NULL;
        }
    }
    return by_name;
}

/* Put a key list in place (NULL, NULL, 0: none); the old one is wiped.
 * Caller holds ext->lock. */
static void tlsctl_keys_swap_locked(tlsctl_ctx_ext *ext, tlsctl_key *keys,
                                    tlsctl_key_ref *by_name, size_t n)
{
    tlsctl_keys_free(ext->keys, ext->by_name, ext->nkeys);
    ext->keys = keys;
    ext->by_name = by_name;
    ext->nkeys = n;
}

/* tlsctl's ticket key callback and client hello callback on ctx (on), or
 * OpenSSL's own keys again (off).  1, or TLSCTL_ERR_OPENSSL. */
static int tlsctl_keys_callbacks(SSL_CTX *ctx, int on)
{
    long ok;
    p_SSL_CTX_set_client_hello_cb(ctx, on ? tlsctl_client_hello_cb : NULL,
                                  NULL);
    if (tlsctl_keys_mode() == TLSCTL_KEYS_EVP)
        ok = p_SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, on ? tlsctl_key_evp_cb
                                                            : NULL);
    else
        ok = p_SSL_CTX_callback_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB,
                                     on ? (tlsctl_void_fn)tlsctl_key_legacy_cb
                                        : NULL);
    return ok == 1 ? 1 : TLSCTL_ERR_OPENSSL;
}

/* records: nbytes / TLSCTL_KEY_RECORD keys (size byte 48 or 80, name,
 * hmac[32], aes[32], unused bytes zero).  Everything is checked here, not
 * trusted from Python: the length, each size byte, at most TLSCTL_MAX_KEYS
 * keys, no name twice (TLSCTL_ERR_BAD_KEYS).  Replaces the key list (and
 * stops a rotation); the old one is wiped. */
static int tlsctl_set_ticket_keys(SSL_CTX *ctx, const unsigned char *records,
                                  size_t nbytes)
{
    tlsctl_ctx_ext *ext;
    tlsctl_key *keys;
    tlsctl_key_ref *by_name;
    size_t i, n;

    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (tlsctl_keys_mode() == TLSCTL_KEYS_NONE)
        return TLSCTL_ERR_NO_KEYS;
    n = nbytes / TLSCTL_KEY_RECORD;
    if (records == NULL || n == 0 || n > TLSCTL_MAX_KEYS ||
        nbytes % TLSCTL_KEY_RECORD != 0)
        return TLSCTL_ERR_BAD_KEYS;
    for (i = 0; i < n; i++)
        if (records[i * TLSCTL_KEY_RECORD] != 48 &&
            records[i * TLSCTL_KEY_RECORD] != 80)
            return TLSCTL_ERR_BAD_KEYS;
    if ((ext = tlsctl_ext_get_or_create(ctx)) == NULL ||
        (keys = calloc(n, sizeof(*keys))) == NULL)
        return TLSCTL_ERR_OPENSSL;
    for (i = 0; i < n; i++) {
        const unsigned char *r = records + i * TLSCTL_KEY_RECORD;
        keys[i].size = r[0];
        memcpy(keys[i].name, r + 1, TLSCTL_KEY_NAME_LEN);
        memcpy(keys[i].hmac, r + 1 + TLSCTL_KEY_NAME_LEN, 32);
        memcpy(keys[i].aes, r + 1 + TLSCTL_KEY_NAME_LEN + 32, 32);
    }
    if ((by_name = tlsctl_keys_index(keys, n)) == NULL) {
        tlsctl_keys_free(keys, NULL, n);
        return TLSCTL_ERR_BAD_KEYS;
    }
    pthread_mutex_lock(&ext->lock);
    tlsctl_keys_swap_locked(ext, keys, by_name, n);
    ext->rotating = 0;
    p_OPENSSL_cleanse(ext->master, sizeof(ext->master));
    pthread_mutex_unlock(&ext->lock);
    return tlsctl_keys_callbacks(ctx, 1);
}

/* ---- rotate_ticket_keys: keys derived from a master and the time ----- */

static int tlsctl_hmac_sha256(const unsigned char *key, size_t keylen,
                              const unsigned char *data, size_t len,
                              unsigned char out[32])
{
    size_t outlen = 0;
    unsigned int ulen = 0;
    if (p_EVP_Q_mac != NULL)
        return p_EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, key, keylen,
                           data, len, out, 32, &outlen) != NULL &&
               outlen == 32;
    if (p_HMAC != NULL && keylen <= INT_MAX)
        return p_HMAC(p_EVP_sha256(), key, (int)keylen, data, len, out,
                      &ulen) != NULL &&
               ulen == 32;
    return 0;
}

static void tlsctl_put_be64(unsigned char *p, uint64_t v)
{
    int i;
    for (i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)(v & 0xff);
}

/* The key of one window: HKDF-SHA256 (RFC 5869) with salt
 * "tlsctl ticket keys", IKM the master, info "tlsctl rotation v1" ||
 * every (8 bytes, big-endian) || window (8 bytes, big-endian, two's
 * complement), 80 bytes of output read as a key file: name[16], HMAC
 * secret[32], AES-256 key[32].  Every process with the same master and
 * period derives the same keys for the same window (docs/keys.md). */
static int tlsctl_derive_key(const unsigned char *master, size_t master_len,
                             uint64_t every, int64_t window, tlsctl_key *out)
{
    static const unsigned char salt[] = "tlsctl ticket keys";
    static const unsigned char label[] = "tlsctl rotation v1";
    unsigned char prk[32], block[32 + sizeof(label) - 1 + 16 + 1], okm[96];
    size_t info_len = sizeof(label) - 1 + 16, off, len;
    int i, ok;

    ok = tlsctl_hmac_sha256(salt, sizeof(salt) - 1, master, master_len, prk);
    for (i = 0, off = 0; ok && i < 3; i++, off += 32) {
        len = 0;
        if (i > 0) { /* T(i) = HMAC(PRK, T(i-1) || info || i) */
            memcpy(block, okm + off - 32, 32);
            len = 32;
        }
        memcpy(block + len, label, sizeof(label) - 1);
        tlsctl_put_be64(block + len + sizeof(label) - 1, every);
        tlsctl_put_be64(block + len + sizeof(label) - 1 + 8, (uint64_t)window);
        block[len + info_len] = (unsigned char)(i + 1);
        ok = tlsctl_hmac_sha256(prk, sizeof(prk), block, len + info_len + 1,
                                okm + off);
    }
    if (ok) {
        out->size = 80;
        memcpy(out->name, okm, TLSCTL_KEY_NAME_LEN);
        memcpy(out->hmac, okm + 16, 32);
        memcpy(out->aes, okm + 48, 32);
    }
    p_OPENSSL_cleanse(prk, sizeof(prk));
    p_OPENSSL_cleanse(block, sizeof(block));
    p_OPENSSL_cleanse(okm, sizeof(okm));
    return ok;
}

/* Remake a rotating context's keys if the window changed: the current
 * window's key encrypts; the keep previous windows' keys and the next
 * window's (a fleet's clocks differ a little) decrypt.  On failure the
 * old keys stay.  Caller holds ext->lock. */
static void tlsctl_rotate_locked(tlsctl_ctx_ext *ext)
{
    int64_t w;
    size_t n, i;
    tlsctl_key *keys;
    tlsctl_key_ref *by_name;
    if (!ext->rotating)
        return;
    w = (int64_t)((uint64_t)time(NULL) / ext->every);
    if (w == ext->window && ext->nkeys > 0)
        return;
    n = (size_t)ext->keep + 2;
    if ((keys = calloc(n, sizeof(*keys))) == NULL)
        return;
    for (i = 0; i < n; i++) {
        int64_t k = i == n - 1 ? w + 1 : w - (int64_t)i;
        if (!tlsctl_derive_key(ext->master, ext->master_len, ext->every, k,
                               &keys[i])) {
            tlsctl_keys_free(keys, NULL, n);
            return;
        }
    }
    if ((by_name = tlsctl_keys_index(keys, n)) == NULL) {
        tlsctl_keys_free(keys, NULL, n);
        return;
    }
    tlsctl_keys_swap_locked(ext, keys, by_name, n);
    ext->window = w;
}

/* Rotate ctx's ticket keys: a key per `every` seconds derived from master
 * (master_len bytes; the same master gives the same keys everywhere),
 * keep previous windows still decrypting.  Replaces set keys.  1,
 * TLSCTL_ERR_NO_KEYS (no HMAC or key callback here), TLSCTL_ERR_BAD_KEYS
 * (bad arguments) or TLSCTL_ERR_OPENSSL. */
static int tlsctl_set_rotation(SSL_CTX *ctx, const unsigned char *master,
                               size_t master_len, unsigned long long every,
                               unsigned int keep)
{
    tlsctl_ctx_ext *ext;
    int ok;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (tlsctl_keys_mode() == TLSCTL_KEYS_NONE ||
        (p_EVP_Q_mac == NULL && p_HMAC == NULL))
        return TLSCTL_ERR_NO_KEYS;
    if (master == NULL || master_len == 0 || master_len > TLSCTL_MASTER_MAX ||
        every == 0 || every > UINT32_MAX || keep > TLSCTL_MAX_KEEP)
        return TLSCTL_ERR_BAD_KEYS;
    if ((ext = tlsctl_ext_get_or_create(ctx)) == NULL)
        return TLSCTL_ERR_OPENSSL;
    pthread_mutex_lock(&ext->lock);
    p_OPENSSL_cleanse(ext->master, sizeof(ext->master));
    memcpy(ext->master, master, master_len);
    ext->master_len = master_len;
    ext->every = every;
    ext->keep = keep;
    ext->rotating = 1;
    tlsctl_keys_swap_locked(ext, NULL, NULL, 0);
    tlsctl_rotate_locked(ext); /* keys now: errors show here, not later */
    ok = ext->nkeys > 0;
    if (!ok)
        ext->rotating = 0;
    pthread_mutex_unlock(&ext->lock);
    return ok ? tlsctl_keys_callbacks(ctx, 1) : TLSCTL_ERR_OPENSSL;
}

/* For tests and introspection: the window a rotating context is in, or
 * INT64_MIN when it does not rotate. */
static long long tlsctl_rotation_window(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    long long w = INT64_MIN;
    if (ext == NULL)
        return w;
    pthread_mutex_lock(&ext->lock);
    if (ext->rotating) {
        tlsctl_rotate_locked(ext);
        w = ext->window;
    }
    pthread_mutex_unlock(&ext->lock);
    return w;
}

static size_t tlsctl_ticket_key_count(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    size_t n;
    if (ext == NULL)
        return 0;
    pthread_mutex_lock(&ext->lock);
    n = ext->nkeys;
    pthread_mutex_unlock(&ext->lock);
    return n;
}

/* Undo tlsctl_set_ticket_keys / tlsctl_set_rotation: OpenSSL's own keys
 * again (injection's extract_from_ssl); the keys are wiped.  1, or
 * TLSCTL_ERR_OPENSSL. */
static int tlsctl_clear_ticket_keys(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    int rc;
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (ext == NULL || (ext->nkeys == 0 && !ext->rotating))
        return 1;
    rc = tlsctl_keys_callbacks(ctx, 0);
    pthread_mutex_lock(&ext->lock);
    tlsctl_keys_swap_locked(ext, NULL, NULL, 0);
    ext->rotating = 0;
    p_OPENSSL_cleanse(ext->master, sizeof(ext->master));
    pthread_mutex_unlock(&ext->lock);
    return rc;
}

/* set_ticket_lifetime: the lifetime clients are told (TLS 1.3
 * ticket_lifetime, TLS 1.2 lifetime hint) is the session timeout, and
 * OpenSSL refuses a session older than its timeout when it is presented
 * (measured, TLS 1.2 and 1.3).  1, or TLSCTL_ERR_BAD_KEYS. */
static int tlsctl_set_lifetime(SSL_CTX *ctx, long seconds)
{
    if (!tlsctl_bound)
        return TLSCTL_ERR_NOT_BOUND;
    if (seconds < 1 || seconds > 604800)
        return TLSCTL_ERR_BAD_KEYS;
    p_SSL_CTX_set_timeout(ctx, seconds);
    return 1;
}

/* For the fork regression test only: hold ctx's key lock for a while (cffi
 * calls this without the GIL), and tell whether another thread holds it. */
static int tlsctl_test_hold_keys(SSL_CTX *ctx, unsigned int milliseconds)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    struct timespec t;
    if (ext == NULL)
        return 0;
    t.tv_sec = milliseconds / 1000;
    t.tv_nsec = (long)(milliseconds % 1000) * 1000000L;
    pthread_mutex_lock(&ext->lock);
    nanosleep(&t, NULL);
    pthread_mutex_unlock(&ext->lock);
    return 1;
}

static int tlsctl_test_keys_busy(SSL_CTX *ctx)
{
    tlsctl_ctx_ext *ext = tlsctl_ext_of(ctx);
    if (ext == NULL)
        return 0;
    if (pthread_mutex_trylock(&ext->lock) != 0)
        return 1;
    pthread_mutex_unlock(&ext->lock);
    return 0;
}
