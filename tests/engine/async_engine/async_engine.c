/*
 * asyncfixture: a test ENGINE that offloads private-key operations to worker threads and pauses
 * the calling ASYNC_JOB meanwhile, the way Intel's QAT engine does with its hardware queues.
 *
 * Theory of operation
 *   - RSA priv_enc (RSA_NO_PADDING for PSS, PKCS#1 for TLS 1.2 PKCS#1 signatures), RSA priv_dec
 *     (RSA key exchange) and EC sign are hooked; everything else is OpenSSL's software method.
 *   - Each hooked operation is a job for ../offload_pool.h (shared with the provider fixture):
 *     inside an ASYNC_JOB (SSL_MODE_ASYNC) it runs on the pool's worker threads while the job
 *     pauses, with the wait-fd hand-off, error handling and counters described there; outside a
 *     job it runs synchronously on the calling thread.
 *   - ASYNCFIXTURE_WORKER_CPU=<n> pins the worker threads to CPU n.
 *   - Counters (operations by kind, and the pool's: offloaded, pauses, jobs in flight and their
 *     peak, synchronous) and the pool's gate are exported as plain C functions for tests (ctypes),
 *     so tests prove concurrency with counts instead of timing.
 *
 * Build: gcc -shared -fPIC -O2 -Wno-deprecated-declarations async_engine.c -o asyncfixture.so \
 *            -lcrypto -lpthread   (it includes ../offload_pool.h)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <string.h>

#include <openssl/ec.h>
#include <openssl/engine.h>
#include <openssl/err.h>
#include <openssl/rsa.h>

/* Counters, exported in this order by asyncfixture_counters (the names offload_pool.h needs are among them). */
enum counter {
    C_OPERATIONS, C_RSA_PRIV_ENC, C_RSA_PRIV_DEC, C_EC_SIGN, C_OFFLOADED, C_PAUSES, C_IN_FLIGHT,
    C_PEAK_IN_FLIGHT, C_SYNCHRONOUS, C_COUNT
};

#include "../offload_pool.h"

static const char *const ENGINE_ID = "asyncfixture";
static const char *const ENGINE_NAME = "async offload test fixture (worker threads + ASYNC_pause_job)";
static const char *const WORKER_CPU_VARIABLE = "ASYNCFIXTURE_WORKER_CPU";

enum op_kind { OP_RSA_PRIV_ENC, OP_RSA_PRIV_DEC, OP_EC_SIGN };

struct work {
    struct offload_job job; /* first: the pool hands it back to perform */
    enum op_kind kind;
    /* RSA */
    int flen;
    const unsigned char *from;
    unsigned char *to;
    RSA *rsa;
    int padding;
    /* EC */
    int type;
    const unsigned char *dgst;
    int dlen;
    unsigned char *sig;
    unsigned int *siglen;
    const BIGNUM *kinv;
    const BIGNUM *r;
    EC_KEY *eckey;

    int result;
};

static pthread_mutex_t users_lock = PTHREAD_MUTEX_INITIALIZER;
static int engine_users; /* ENGINE_init calls not yet matched by finish, over all loaded copies */

/* Methods are created once per loaded copy of this library and live as long as it is mapped:
 * several ENGINE structures (one per dynamic LOAD) may share them. */
static RSA_METHOD *fixture_rsa_method;
static EC_KEY_METHOD *fixture_ec_method;
static int (*software_rsa_priv_enc)(int, const unsigned char *, unsigned char *, RSA *, int);
static int (*software_rsa_priv_dec)(int, const unsigned char *, unsigned char *, RSA *, int);
static int (*software_ec_sign)(int, const unsigned char *, int, unsigned char *, unsigned int *,
                               const BIGNUM *, const BIGNUM *, EC_KEY *);

void asyncfixture_counters(long long *out, int count) { offload_pool_counters(out, count); }
void asyncfixture_reset_counters(void) { offload_pool_reset_counters(); }
/* Closed gate: workers take no work, so every submitted job stays paused until it opens. */
void asyncfixture_set_gate(int open) { offload_pool_set_gate(open); }

static int perform(struct offload_job *job)
{
    struct work *w = (struct work *)job;
    switch (w->kind) {
    case OP_RSA_PRIV_ENC:
        w->result = software_rsa_priv_enc(w->flen, w->from, w->to, w->rsa, w->padding);
        return w->result >= 0;
    case OP_RSA_PRIV_DEC:
        w->result = software_rsa_priv_dec(w->flen, w->from, w->to, w->rsa, w->padding);
        return w->result >= 0;
    case OP_EC_SIGN:
        w->result = software_ec_sign(w->type, w->dgst, w->dlen, w->sig, w->siglen, w->kinv, w->r,
                                     w->eckey);
        return w->result == 1;
    }
    return 0;
}

static int fixture_rsa_priv_enc(int flen, const unsigned char *from, unsigned char *to, RSA *rsa,
                                int padding)
{
    struct work w = {.job.perform = perform, .kind = OP_RSA_PRIV_ENC, .flen = flen, .from = from,
                     .to = to, .rsa = rsa, .padding = padding};
    atomic_fetch_add(&counters[C_OPERATIONS], 1);
    atomic_fetch_add(&counters[C_RSA_PRIV_ENC], 1);
    offload_pool_run(&w.job, ERR_LIB_RSA);
    return w.result;
}

static int fixture_rsa_priv_dec(int flen, const unsigned char *from, unsigned char *to, RSA *rsa,
                                int padding)
{
    struct work w = {.job.perform = perform, .kind = OP_RSA_PRIV_DEC, .flen = flen, .from = from,
                     .to = to, .rsa = rsa, .padding = padding};
    atomic_fetch_add(&counters[C_OPERATIONS], 1);
    atomic_fetch_add(&counters[C_RSA_PRIV_DEC], 1);
    offload_pool_run(&w.job, ERR_LIB_RSA);
    return w.result;
}

static int fixture_ec_sign(int type, const unsigned char *dgst, int dlen, unsigned char *sig,
                           unsigned int *siglen, const BIGNUM *kinv, const BIGNUM *r, EC_KEY *eckey)
{
    struct work w = {.job.perform = perform, .kind = OP_EC_SIGN, .type = type, .dgst = dgst,
                     .dlen = dlen, .sig = sig, .siglen = siglen, .kinv = kinv, .r = r, .eckey = eckey};
    atomic_fetch_add(&counters[C_OPERATIONS], 1);
    atomic_fetch_add(&counters[C_EC_SIGN], 1);
    offload_pool_run(&w.job, ERR_LIB_EC);
    return w.result;
}

/* The first init starts the pool's workers and the last finish stops them. */
static int fixture_init(ENGINE *e)
{
    (void)e;
    pthread_mutex_lock(&users_lock);
    int ok = engine_users > 0 || offload_pool_start(WORKER_CPU_VARIABLE);
    if (ok)
        engine_users++;
    pthread_mutex_unlock(&users_lock);
    return ok;
}

static int fixture_finish(ENGINE *e)
{
    (void)e;
    pthread_mutex_lock(&users_lock);
    if (--engine_users == 0)
        offload_pool_stop();
    pthread_mutex_unlock(&users_lock);
    return 1;
}

static int create_methods(void)
{
    if (fixture_rsa_method != NULL)
        return 1;
    const RSA_METHOD *software_rsa = RSA_PKCS1_OpenSSL();
    software_rsa_priv_enc = RSA_meth_get_priv_enc(software_rsa);
    software_rsa_priv_dec = RSA_meth_get_priv_dec(software_rsa);
    RSA_METHOD *rsa = RSA_meth_dup(software_rsa);
    if (rsa == NULL || !RSA_meth_set1_name(rsa, ENGINE_NAME)
        || !RSA_meth_set_priv_enc(rsa, fixture_rsa_priv_enc)
        || !RSA_meth_set_priv_dec(rsa, fixture_rsa_priv_dec)) {
        RSA_meth_free(rsa);
        return 0;
    }
    const EC_KEY_METHOD *software_ec = EC_KEY_OpenSSL();
    int (*sign_setup)(EC_KEY *, BN_CTX *, BIGNUM **, BIGNUM **);
    ECDSA_SIG *(*sign_sig)(const unsigned char *, int, const BIGNUM *, const BIGNUM *, EC_KEY *);
    EC_KEY_METHOD_get_sign(software_ec, &software_ec_sign, &sign_setup, &sign_sig);
    EC_KEY_METHOD *ec = EC_KEY_METHOD_new(software_ec);
    if (ec == NULL) {
        RSA_meth_free(rsa);
        return 0;
    }
    EC_KEY_METHOD_set_sign(ec, fixture_ec_sign, sign_setup, sign_sig);
    fixture_rsa_method = rsa;
    fixture_ec_method = ec;
    return 1;
}

static int bind(ENGINE *e, const char *id)
{
    if (id != NULL && strcmp(id, ENGINE_ID) != 0)
        return 0;
    return create_methods() && ENGINE_set_id(e, ENGINE_ID) && ENGINE_set_name(e, ENGINE_NAME)
           && ENGINE_set_RSA(e, fixture_rsa_method) && ENGINE_set_EC(e, fixture_ec_method)
           && ENGINE_set_init_function(e, fixture_init)
           && ENGINE_set_finish_function(e, fixture_finish);
}

IMPLEMENT_DYNAMIC_BIND_FN(bind)
IMPLEMENT_DYNAMIC_CHECK_FN()
