/*
 * testoffload: a test OpenSSL 3 PROVIDER that holds RSA and EC keys and signs with them on
 * worker threads, pausing the calling ASYNC_JOB meanwhile, the way Intel's qatprovider does with
 * its hardware queues. The provider-era twin of ../async_engine/async_engine.c.
 *
 * Theory of operation
 *   - Keys come in through this provider's OSSL_STORE: `testoffload:<path to a PEM key>`. The
 *     store reads the file into a private library context that has only OpenSSL's `default`
 *     provider, and hands the key to the core by reference; the core gives it to this provider's
 *     KEYMGMT (load), so the EVP_PKEY the application gets is held here, like a pkcs11-provider
 *     key is held by the token. Signatures with such a key are fetched from this provider.
 *   - KEYMGMT "RSA" and "EC" wrap an EVP_PKEY of the private context: import, export, has, match
 *     and get_params are answered by that EVP_PKEY (so a certificate's public key can be compared
 *     with ours, and libssl learns bits, size and curve). No key generation: ephemeral keys stay in
 *     `default`, which is activated before this provider, so unqualified fetches find it first.
 *   - SIGNATURE "RSA" and "ECDSA" are digest-sign only (all TLS needs): init, update and
 *     parameters (PSS padding, salt length) go to an EVP_MD_CTX of the private context; the final
 *     signature is a job for ../offload_pool.h (shared with the engine fixture): inside an
 *     ASYNC_JOB (SSL_MODE_ASYNC) it runs on the pool's worker threads while the job pauses, with
 *     the wait-fd hand-off, error handling and counters described there; outside a job it runs
 *     synchronously on the caller's thread.
 *   - TESTOFFLOAD_WORKER_CPU=<n> pins the worker threads to CPU n.
 *   - Counters (signatures by kind, keys loaded, and the pool's: offloaded, pauses, jobs in flight
 *     and their peak, synchronous) and the pool's gate are plain exported C functions for tests
 *     (ctypes), so tests prove concurrency with counts instead of timing.
 *
 * Build: gcc -shared -fPIC -O2 async_provider.c -o testoffload.so -lcrypto -lpthread
 *        (it includes ../offload_pool.h)
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/pem.h>
#include <openssl/provider.h>

/* Counters, exported in this order by testoffload_counters (the names offload_pool.h needs are among them). */
enum counter {
    C_SIGNATURES, C_RSA_SIGN, C_EC_SIGN, C_OFFLOADED, C_PAUSES, C_IN_FLIGHT, C_PEAK_IN_FLIGHT,
    C_SYNCHRONOUS, C_KEYS_LOADED, C_COUNT
};

#include "../offload_pool.h"

#define PROPERTIES "provider=testoffload"
#define STORE_SCHEME "testoffload"
static const char *const WORKER_CPU_VARIABLE = "TESTOFFLOAD_WORKER_CPU";

struct provider {
    OSSL_LIB_CTX *private_context; /* only OpenSSL's default provider: where the math happens */
    OSSL_PROVIDER *software;
};

struct key {
    EVP_PKEY *pkey; /* in the private context */
    int is_rsa;
    int has_private;
};

struct signing {
    struct provider *provider;
    struct key *key;
    EVP_MD_CTX *digest; /* digest-sign context of the private context */
};

struct work {
    struct offload_job job; /* first: the pool hands it back to perform */
    EVP_MD_CTX *digest;
    unsigned char *signature;
    size_t *length;
    const unsigned char *data; /* NULL: finish what update gave (DigestSignFinal) */
    size_t data_length;
};

void testoffload_counters(long long *out, int count) { offload_pool_counters(out, count); }
void testoffload_reset_counters(void) { offload_pool_reset_counters(); }
/* Closed gate: workers take no work, so every submitted job stays paused until it opens. */
void testoffload_set_gate(int open) { offload_pool_set_gate(open); }

static int perform(struct offload_job *job)
{
    struct work *w = (struct work *)job;
    if (w->data != NULL)
        return EVP_DigestSign(w->digest, w->signature, w->length, w->data, w->data_length) == 1;
    return EVP_DigestSignFinal(w->digest, w->signature, w->length) == 1;
}

/* ---- KEYMGMT -------------------------------------------------------------------------------- */
/* OpenSSL 3.0 keeps active providers sorted by name and takes the first match of an unqualified
 * fetch: this provider's name sorts after "default", so software keys and ephemeral keys never
 * land here by accident (a name like "asyncprovider" would capture every RSA key in the process). */

static struct key *key_new(int is_rsa)
{
    struct key *key = calloc(1, sizeof *key);
    if (key != NULL)
        key->is_rsa = is_rsa;
    return key;
}
static void *rsa_new(void *provctx) { (void)provctx; return key_new(1); }
static void *ec_new(void *provctx) { (void)provctx; return key_new(0); }

static void key_free(void *keydata)
{
    struct key *key = keydata;
    if (key == NULL)
        return;
    EVP_PKEY_free(key->pkey);
    free(key);
}

static struct provider *the_provider; /* one per process: keymgmt import needs its context */

static int key_import(void *keydata, int selection, const OSSL_PARAM params[])
{
    struct key *key = keydata;
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(the_provider->private_context, key->is_rsa ? "RSA" : "EC", NULL);
    EVP_PKEY *pkey = NULL;
    int ok = ctx != NULL && EVP_PKEY_fromdata_init(ctx) == 1
             && EVP_PKEY_fromdata(ctx, &pkey, selection, (OSSL_PARAM *)params) == 1;
    EVP_PKEY_CTX_free(ctx);
    if (!ok)
        return 0;
    EVP_PKEY_free(key->pkey);
    key->pkey = pkey;
    key->has_private = (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0;
    return 1;
}

/* Public parts only: like a token's, the private key never leaves this provider. OpenSSL's first
 * try for a signature is the first provider's (`default`), to which it exports the key: refusing
 * that export is what makes it come back for this provider's signature. */
static int key_export(void *keydata, int selection, OSSL_CALLBACK *callback, void *callback_argument)
{
    struct key *key = keydata;
    if (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY)
        return 0;
    return key->pkey != NULL && EVP_PKEY_export(key->pkey, selection, callback, callback_argument) == 1;
}

static const OSSL_PARAM rsa_types[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0), OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_D, NULL, 0), OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_FACTOR1, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_FACTOR2, NULL, 0), OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_EXPONENT1, NULL, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_EXPONENT2, NULL, 0), OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_COEFFICIENT1, NULL, 0),
    OSSL_PARAM_END};
static const OSSL_PARAM ec_types[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0), OSSL_PARAM_BN(OSSL_PKEY_PARAM_PRIV_KEY, NULL, 0),
    OSSL_PARAM_END};
static const OSSL_PARAM *rsa_key_types(int selection) { (void)selection; return rsa_types; }
static const OSSL_PARAM *ec_key_types(int selection) { (void)selection; return ec_types; }

static int key_has(const void *keydata, int selection)
{
    const struct key *key = keydata;
    if (key == NULL || key->pkey == NULL)
        return selection == 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && !key->has_private)
        return 0;
    return 1;
}

static int key_match(const void *first, const void *second, int selection)
{
    const struct key *a = first, *b = second;
    if (a->pkey == NULL || b->pkey == NULL)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR)
        return EVP_PKEY_eq(a->pkey, b->pkey) == 1;
    return EVP_PKEY_parameters_eq(a->pkey, b->pkey) == 1;
}

static int key_get_params(void *keydata, OSSL_PARAM params[])
{
    struct key *key = keydata;
    return key->pkey != NULL && EVP_PKEY_get_params(key->pkey, params) == 1;
}

static const OSSL_PARAM key_gettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL), OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL), OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0), OSSL_PARAM_END};
static const OSSL_PARAM *key_gettable_params(void *provctx) { (void)provctx; return key_gettable; }

static const char *rsa_operation_name(int operation_id) { (void)operation_id; return "RSA"; }
static const char *ec_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_SIGNATURE ? "ECDSA" : "EC";
}

static void *key_load(const void *reference, size_t reference_size)
{
    struct key *key = NULL;
    if (reference_size != sizeof key)
        return NULL;
    memcpy(&key, reference, sizeof key); /* ownership passes to the core's EVP_PKEY */
    memset((void *)reference, 0, sizeof key);
    return key;
}

#define KEYMGMT(prefix)                                                                      \
    static const OSSL_DISPATCH prefix##_keymgmt[] = {                                         \
        {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))prefix##_new},                                \
        {OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))key_free},                                   \
        {OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))key_load},                                   \
        {OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))key_import},                               \
        {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))prefix##_key_types},                 \
        {OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))key_export},                               \
        {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))prefix##_key_types},                 \
        {OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))key_has},                                     \
        {OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))key_match},                                 \
        {OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))key_get_params},                       \
        {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))key_gettable_params},             \
        {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))prefix##_operation_name},    \
        {0, NULL}}
KEYMGMT(rsa);
KEYMGMT(ec);

/* ---- SIGNATURE (digest-sign) ---------------------------------------------------------------- */

static void *signing_new(void *provctx, const char *propq)
{
    (void)propq;
    struct signing *signing = calloc(1, sizeof *signing);
    if (signing != NULL)
        signing->provider = provctx;
    return signing;
}

static void signing_free(void *ctx)
{
    struct signing *signing = ctx;
    if (signing == NULL)
        return;
    EVP_MD_CTX_free(signing->digest);
    free(signing);
}

static void *signing_dup(void *ctx)
{
    struct signing *source = ctx, *copy = signing_new(source->provider, NULL);
    if (copy == NULL)
        return NULL;
    copy->key = source->key;
    if (source->digest != NULL) {
        copy->digest = EVP_MD_CTX_new();
        if (copy->digest == NULL || !EVP_MD_CTX_copy_ex(copy->digest, source->digest)) {
            signing_free(copy);
            return NULL;
        }
    }
    return copy;
}

static int digest_sign_init(void *ctx, const char *mdname, void *provkey, const OSSL_PARAM params[])
{
    struct signing *signing = ctx;
    struct key *key = provkey;
    if (key == NULL || key->pkey == NULL || !key->has_private)
        return 0;
    EVP_MD_CTX_free(signing->digest);
    signing->key = key;
    signing->digest = EVP_MD_CTX_new();
    return signing->digest != NULL
           && EVP_DigestSignInit_ex(signing->digest, NULL, mdname, signing->provider->private_context, NULL,
                                    key->pkey, params) == 1;
}

static int digest_sign_update(void *ctx, const unsigned char *data, size_t length)
{
    struct signing *signing = ctx;
    return EVP_DigestSignUpdate(signing->digest, data, length) == 1;
}

static int offload(struct signing *signing, unsigned char *signature, size_t *length, size_t size,
                   const unsigned char *data, size_t data_length)
{
    if (signature == NULL) { /* the caller asks for the size */
        *length = (size_t)EVP_PKEY_get_size(signing->key->pkey);
        return 1;
    }
    *length = size;
    atomic_fetch_add(&counters[C_SIGNATURES], 1);
    atomic_fetch_add(&counters[signing->key->is_rsa ? C_RSA_SIGN : C_EC_SIGN], 1);
    struct work w = {.job.perform = perform, .digest = signing->digest, .signature = signature,
                     .length = length, .data = data, .data_length = data_length};
    return offload_pool_run(&w.job, ERR_LIB_PROV);
}

static int digest_sign_final(void *ctx, unsigned char *signature, size_t *length, size_t size)
{
    return offload(ctx, signature, length, size, NULL, 0);
}

static int digest_sign(void *ctx, unsigned char *signature, size_t *length, size_t size,
                       const unsigned char *data, size_t data_length)
{
    static const unsigned char empty[1];
    return offload(ctx, signature, length, size, data != NULL ? data : empty, data_length);
}

static EVP_PKEY_CTX *inner_key_context(struct signing *signing)
{
    return signing->digest != NULL ? EVP_MD_CTX_get_pkey_ctx(signing->digest) : NULL;
}

static int signing_set_params(void *ctx, const OSSL_PARAM params[])
{
    EVP_PKEY_CTX *inner = inner_key_context(ctx);
    return params == NULL || (inner != NULL && EVP_PKEY_CTX_set_params(inner, params) == 1);
}

static int signing_get_params(void *ctx, OSSL_PARAM params[])
{
    EVP_PKEY_CTX *inner = inner_key_context(ctx);
    return inner != NULL && EVP_PKEY_CTX_get_params(inner, params) == 1;
}

static const OSSL_PARAM no_params[] = {OSSL_PARAM_END};

static const OSSL_PARAM *signing_settable(void *ctx, void *provctx)
{
    (void)provctx;
    EVP_PKEY_CTX *inner = ctx != NULL ? inner_key_context(ctx) : NULL;
    const OSSL_PARAM *settable = inner != NULL ? EVP_PKEY_CTX_settable_params(inner) : NULL;
    return settable != NULL ? settable : no_params;
}

static const OSSL_PARAM *signing_gettable(void *ctx, void *provctx)
{
    (void)provctx;
    EVP_PKEY_CTX *inner = ctx != NULL ? inner_key_context(ctx) : NULL;
    const OSSL_PARAM *gettable = inner != NULL ? EVP_PKEY_CTX_gettable_params(inner) : NULL;
    return gettable != NULL ? gettable : no_params;
}

static const OSSL_DISPATCH signature_functions[] = {
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))signing_new},
    {OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))signing_free},
    {OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))signing_dup},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))digest_sign_init},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, (void (*)(void))digest_sign_update},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, (void (*)(void))digest_sign_final},
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))digest_sign},
    {OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))signing_set_params},
    {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))signing_settable},
    {OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, (void (*)(void))signing_get_params},
    {OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, (void (*)(void))signing_gettable},
    {0, NULL}};

/* ---- STORE: testoffload:<path to a PEM private key> ------------------------------------- */

struct loader {
    struct provider *provider;
    char *path;
    int done;
};

static void *store_open(void *provctx, const char *uri)
{
    size_t prefix = strlen(STORE_SCHEME ":");
    if (strncmp(uri, STORE_SCHEME ":", prefix) != 0)
        return NULL;
    struct loader *loader = calloc(1, sizeof *loader);
    if (loader == NULL)
        return NULL;
    loader->provider = provctx;
    loader->path = strdup(uri + prefix);
    return loader;
}

static int store_load(void *ctx, OSSL_CALLBACK *object_cb, void *object_cbarg,
                      OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    (void)pw_cb, (void)pw_cbarg;
    struct loader *loader = ctx;
    loader->done = 1;
    BIO *file = BIO_new_file(loader->path, "r");
    if (file == NULL)
        return 0;
    EVP_PKEY *pkey = PEM_read_bio_PrivateKey_ex(file, NULL, NULL, NULL, loader->provider->private_context, NULL);
    BIO_free(file);
    if (pkey == NULL)
        return 0;
    int is_rsa = EVP_PKEY_is_a(pkey, "RSA");
    if (!is_rsa && !EVP_PKEY_is_a(pkey, "EC")) {
        EVP_PKEY_free(pkey);
        return 0;
    }
    struct key *key = key_new(is_rsa);
    if (key == NULL) {
        EVP_PKEY_free(pkey);
        return 0;
    }
    key->pkey = pkey;
    key->has_private = 1;
    atomic_fetch_add(&counters[C_KEYS_LOADED], 1);
    int object_type = OSSL_OBJECT_PKEY;
    OSSL_PARAM params[] = {
        OSSL_PARAM_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
        OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, is_rsa ? "RSA" : "EC", 0),
        OSSL_PARAM_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &key, sizeof key),
        OSSL_PARAM_END};
    int ok = object_cb(params, object_cbarg);
    key_free(key); /* NULL when KEYMGMT load took it */
    return ok;
}

static int store_eof(void *ctx) { return ((struct loader *)ctx)->done; }

static int store_close(void *ctx)
{
    struct loader *loader = ctx;
    free(loader->path);
    free(loader);
    return 1;
}

static int store_set_params(void *ctx, const OSSL_PARAM params[]) { (void)ctx, (void)params; return 1; }
static const OSSL_PARAM *store_settable(void *provctx) { (void)provctx; return no_params; }

static const OSSL_DISPATCH store_functions[] = {
    {OSSL_FUNC_STORE_OPEN, (void (*)(void))store_open},
    {OSSL_FUNC_STORE_LOAD, (void (*)(void))store_load},
    {OSSL_FUNC_STORE_EOF, (void (*)(void))store_eof},
    {OSSL_FUNC_STORE_CLOSE, (void (*)(void))store_close},
    {OSSL_FUNC_STORE_SET_CTX_PARAMS, (void (*)(void))store_set_params},
    {OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, (void (*)(void))store_settable},
    {0, NULL}};

/* ---- the provider ----------------------------------------------------------------------------- */

static const OSSL_ALGORITHM keymgmt_algorithms[] = {
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", PROPERTIES, rsa_keymgmt, "testoffload RSA keys"},
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", PROPERTIES, ec_keymgmt, "testoffload EC keys"},
    {NULL, NULL, NULL, NULL}};
static const OSSL_ALGORITHM signature_algorithms[] = {
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", PROPERTIES, signature_functions, "RSA on worker threads"},
    {"ECDSA", PROPERTIES, signature_functions, "ECDSA on worker threads"},
    {NULL, NULL, NULL, NULL}};
static const OSSL_ALGORITHM store_algorithms[] = {
    {STORE_SCHEME, PROPERTIES, store_functions, "PEM key files held by testoffload"},
    {NULL, NULL, NULL, NULL}};

static const OSSL_ALGORITHM *query_operation(void *provctx, int operation_id, int *no_cache)
{
    (void)provctx;
    *no_cache = 0;
    switch (operation_id) {
    case OSSL_OP_KEYMGMT: return keymgmt_algorithms;
    case OSSL_OP_SIGNATURE: return signature_algorithms;
    case OSSL_OP_STORE: return store_algorithms;
    }
    return NULL;
}

static void teardown(void *provctx)
{
    struct provider *provider = provctx;
    offload_pool_stop();
    OSSL_PROVIDER_unload(provider->software);
    OSSL_LIB_CTX_free(provider->private_context);
    free(provider);
    the_provider = NULL;
}

static const OSSL_DISPATCH provider_functions[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))teardown},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))query_operation},
    {0, NULL}};

int OSSL_provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in, const OSSL_DISPATCH **out,
                       void **provctx)
{
    (void)handle, (void)in;
    struct provider *provider = calloc(1, sizeof *provider);
    if (provider == NULL)
        return 0;
    provider->private_context = OSSL_LIB_CTX_new();
    provider->software = provider->private_context ? OSSL_PROVIDER_load(provider->private_context, "default") : NULL;
    if (provider->software == NULL || !offload_pool_start(WORKER_CPU_VARIABLE)) {
        OSSL_LIB_CTX_free(provider->private_context);
        free(provider);
        return 0;
    }
    the_provider = provider;
    *out = provider_functions;
    *provctx = provider;
    return 1;
}
