/*
 * asyncfixture: a test ENGINE that offloads private-key operations to worker threads and pauses
 * the calling ASYNC_JOB meanwhile, the way Intel's QAT engine does with its hardware queues.
 *
 * Theory of operation
 *   - RSA priv_enc (RSA_NO_PADDING for PSS, PKCS#1 for TLS 1.2 PKCS#1 signatures), RSA priv_dec
 *     (RSA key exchange) and EC sign are hooked; everything else is OpenSSL's software method.
 *   - Inside an ASYNC_JOB (SSL_MODE_ASYNC), an operation is queued for the worker threads and the
 *     job pauses with ASYNC_pause_job until the work is done. The job's ASYNC_WAIT_CTX owns one
 *     non-blocking eventfd for its whole life (created on first use, closed by the wait-ctx cleanup
 *     when the SSL object is freed); a worker marks the work done BEFORE writing the eventfd, so a
 *     resumed job never finds the fd readable with nothing done. A spurious resume (the caller
 *     retried early) simply pauses again. The job takes the fd's signal before returning (one read), so
 *     no stale readiness is left behind.
 *   - Outside a job (no async mode) the operation runs synchronously on the calling thread.
 *   - Errors raised on a worker land on the worker's error queue: they are cleared there and a
 *     generic error is raised on the caller's queue instead.
 *   - ASYNCFIXTURE_WORKER_CPU=<n> pins the worker threads to CPU n.
 *   - Counters (operations by kind, pauses, jobs in flight and their peak) and a "gate" that holds
 *     workers back are exported as plain C functions for tests (ctypes), so tests prove
 *     concurrency with counts instead of timing.
 *
 * Build: gcc -shared -fPIC -O2 -Wno-deprecated-declarations async_engine.c -o asyncfixture.so \
 *            -lcrypto -lpthread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <openssl/async.h>
#include <openssl/ec.h>
#include <openssl/engine.h>
#include <openssl/err.h>
#include <openssl/rsa.h>

#define WORKER_COUNT 2

static const char *const ENGINE_ID = "asyncfixture";
static const char *const ENGINE_NAME = "async offload test fixture (worker threads + ASYNC_pause_job)";
static const char WAIT_FD_KEY = 0; /* its address keys our fd in each ASYNC_WAIT_CTX */

enum op_kind { OP_RSA_PRIV_ENC, OP_RSA_PRIV_DEC, OP_EC_SIGN };

struct work {
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
    int wake_fd;
    atomic_int done;      /* set by the worker once result is final */
    atomic_int signalled; /* set by the worker after writing wake_fd */
    struct work *next;
};

/* Counters, exported in this order by asyncfixture_counters. */
enum counter {
    C_OPERATIONS, C_RSA_PRIV_ENC, C_RSA_PRIV_DEC, C_EC_SIGN, C_OFFLOADED, C_PAUSES, C_IN_FLIGHT,
    C_PEAK_IN_FLIGHT, C_SYNCHRONOUS, C_COUNT
};
static atomic_llong counters[C_COUNT];

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_changed = PTHREAD_COND_INITIALIZER;
static struct work *queue_head, *queue_tail;
static int gate_open = 1;
static int stopping;
static int engine_users; /* ENGINE_init calls not yet matched by finish, over all loaded copies */
static pthread_t workers[WORKER_COUNT];

/* Methods are created once per loaded copy of this library and live as long as it is mapped:
 * several ENGINE structures (one per dynamic LOAD) may share them. */
static RSA_METHOD *fixture_rsa_method;
static EC_KEY_METHOD *fixture_ec_method;
static int (*software_rsa_priv_enc)(int, const unsigned char *, unsigned char *, RSA *, int);
static int (*software_rsa_priv_dec)(int, const unsigned char *, unsigned char *, RSA *, int);
static int (*software_ec_sign)(int, const unsigned char *, int, unsigned char *, unsigned int *,
                               const BIGNUM *, const BIGNUM *, EC_KEY *);

void asyncfixture_counters(long long *out, int count)
{
    for (int i = 0; i < count && i < C_COUNT; i++)
        out[i] = atomic_load(&counters[i]);
}

void asyncfixture_reset_counters(void)
{
    for (int i = 0; i < C_COUNT; i++)
        if (i != C_IN_FLIGHT)
            atomic_store(&counters[i], 0);
    atomic_store(&counters[C_PEAK_IN_FLIGHT], atomic_load(&counters[C_IN_FLIGHT]));
}

/* Closed gate: workers take no work, so every submitted job stays paused until it opens. */
void asyncfixture_set_gate(int open)
{
    pthread_mutex_lock(&queue_lock);
    gate_open = open;
    pthread_cond_broadcast(&queue_changed);
    pthread_mutex_unlock(&queue_lock);
}

static void perform(struct work *w)
{
    switch (w->kind) {
    case OP_RSA_PRIV_ENC:
        w->result = software_rsa_priv_enc(w->flen, w->from, w->to, w->rsa, w->padding);
        break;
    case OP_RSA_PRIV_DEC:
        w->result = software_rsa_priv_dec(w->flen, w->from, w->to, w->rsa, w->padding);
        break;
    case OP_EC_SIGN:
        w->result = software_ec_sign(w->type, w->dgst, w->dlen, w->sig, w->siglen, w->kinv, w->r,
                                     w->eckey);
        break;
    }
}

static int succeeded(const struct work *w)
{
    return w->kind == OP_EC_SIGN ? w->result == 1 : w->result >= 0;
}

/* ASYNCFIXTURE_WORKER_CPU=<n> pins the worker threads to CPU n (the bench puts them on the core the proxy does
 * not use, as an accelerator would sit beside the CPU). */
static void pin_worker(void)
{
    const char *cpu = getenv("ASYNCFIXTURE_WORKER_CPU");
    if (cpu == NULL || *cpu == '\0')
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(atoi(cpu), &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *worker_main(void *unused)
{
    (void)unused;
    pin_worker();
    for (;;) {
        pthread_mutex_lock(&queue_lock);
        while (!stopping && (queue_head == NULL || !gate_open))
            pthread_cond_wait(&queue_changed, &queue_lock);
        if (queue_head == NULL) { /* stopping with nothing left */
            pthread_mutex_unlock(&queue_lock);
            return NULL;
        }
        struct work *w = queue_head;
        queue_head = w->next;
        if (queue_head == NULL)
            queue_tail = NULL;
        pthread_mutex_unlock(&queue_lock);

        perform(w);
        if (!succeeded(w))
            ERR_clear_error(); /* this thread's queue; the job raises its own error */
        int fd = w->wake_fd;
        atomic_store(&w->done, 1);
        uint64_t one = 1;
        while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
            ;
        atomic_store(&w->signalled, 1);
    }
}

static void enqueue(struct work *w)
{
    pthread_mutex_lock(&queue_lock);
    w->next = NULL;
    if (queue_tail)
        queue_tail->next = w;
    else
        queue_head = w;
    queue_tail = w;
    pthread_cond_signal(&queue_changed);
    pthread_mutex_unlock(&queue_lock);
}

static void close_wait_fd(ASYNC_WAIT_CTX *ctx, const void *key, OSSL_ASYNC_FD fd, void *custom)
{
    (void)ctx, (void)key, (void)custom;
    close(fd);
}

static int wait_fd_for(ASYNC_JOB *job)
{
    ASYNC_WAIT_CTX *ctx = ASYNC_get_wait_ctx(job);
    OSSL_ASYNC_FD fd;
    void *custom;
    if (ctx == NULL)
        return -1;
    if (ASYNC_WAIT_CTX_get_fd(ctx, &WAIT_FD_KEY, &fd, &custom))
        return fd;
    fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (!ASYNC_WAIT_CTX_set_wait_fd(ctx, &WAIT_FD_KEY, fd, NULL, close_wait_fd)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* One read takes an eventfd's whole count (and EAGAIN when there is none): whether it took a signal. */
static int take_signal(int fd)
{
    uint64_t value;
    ssize_t got;
    while ((got = read(fd, &value, sizeof value)) < 0 && errno == EINTR)
        ;
    return got > 0;
}

static void note_in_flight(long long delta)
{
    long long now = atomic_fetch_add(&counters[C_IN_FLIGHT], delta) + delta;
    long long peak = atomic_load(&counters[C_PEAK_IN_FLIGHT]);
    while (now > peak && !atomic_compare_exchange_weak(&counters[C_PEAK_IN_FLIGHT], &peak, now))
        ;
}

static int run(struct work *w, int error_library)
{
    atomic_fetch_add(&counters[C_OPERATIONS], 1);
    ASYNC_JOB *job = ASYNC_get_current_job();
    int fd = job ? wait_fd_for(job) : -1;
    if (fd < 0) {
        atomic_fetch_add(&counters[C_SYNCHRONOUS], 1);
        perform(w);
        return w->result;
    }
    w->wake_fd = fd;
    atomic_init(&w->done, 0);
    atomic_init(&w->signalled, 0);
    atomic_fetch_add(&counters[C_OFFLOADED], 1);
    note_in_flight(1);
    enqueue(w);
    /* This wait fd has one writer: our work's worker, once. A read that took a signal after a
     * pause took that write, so the fd is quiet again and nothing is left to drain; a job that
     * found the work done without reading (done before the first pause, or an early resume)
     * takes the signal once it is written. One read per pause, not three. */
    int taken = 0;
    while (!atomic_load(&w->done)) {
        atomic_fetch_add(&counters[C_PAUSES], 1);
        if (!ASYNC_pause_job()) { /* cannot pause: block on the fd instead */
            struct pollfd readable = {.fd = fd, .events = POLLIN};
            poll(&readable, 1, 100);
        }
        taken = take_signal(fd);
    }
    while (!atomic_load(&w->signalled))
        sched_yield(); /* the worker is between "done" and its write (w lives on our stack): microseconds */
    if (!taken)
        take_signal(fd);
    note_in_flight(-1);
    if (!succeeded(w))
        ERR_raise(error_library, ERR_R_INTERNAL_ERROR);
    return w->result;
}

static int fixture_rsa_priv_enc(int flen, const unsigned char *from, unsigned char *to, RSA *rsa,
                                int padding)
{
    struct work w = {.kind = OP_RSA_PRIV_ENC, .flen = flen, .from = from, .to = to, .rsa = rsa,
                     .padding = padding};
    atomic_fetch_add(&counters[C_RSA_PRIV_ENC], 1);
    return run(&w, ERR_LIB_RSA);
}

static int fixture_rsa_priv_dec(int flen, const unsigned char *from, unsigned char *to, RSA *rsa,
                                int padding)
{
    struct work w = {.kind = OP_RSA_PRIV_DEC, .flen = flen, .from = from, .to = to, .rsa = rsa,
                     .padding = padding};
    atomic_fetch_add(&counters[C_RSA_PRIV_DEC], 1);
    return run(&w, ERR_LIB_RSA);
}

static int fixture_ec_sign(int type, const unsigned char *dgst, int dlen, unsigned char *sig,
                           unsigned int *siglen, const BIGNUM *kinv, const BIGNUM *r, EC_KEY *eckey)
{
    struct work w = {.kind = OP_EC_SIGN, .type = type, .dgst = dgst, .dlen = dlen, .sig = sig,
                     .siglen = siglen, .kinv = kinv, .r = r, .eckey = eckey};
    atomic_fetch_add(&counters[C_EC_SIGN], 1);
    return run(&w, ERR_LIB_EC);
}

static void stop_workers(int started)
{
    pthread_mutex_lock(&queue_lock);
    stopping = 1;
    pthread_cond_broadcast(&queue_changed);
    pthread_mutex_unlock(&queue_lock);
    for (int i = 0; i < started; i++)
        pthread_join(workers[i], NULL);
}

static int fixture_init(ENGINE *e)
{
    (void)e;
    pthread_mutex_lock(&queue_lock);
    int start = engine_users++ == 0;
    stopping = 0;
    pthread_mutex_unlock(&queue_lock);
    if (!start)
        return 1;
    for (int i = 0; i < WORKER_COUNT; i++) {
        if (pthread_create(&workers[i], NULL, worker_main, NULL) != 0) {
            stop_workers(i);
            pthread_mutex_lock(&queue_lock);
            engine_users--;
            pthread_mutex_unlock(&queue_lock);
            return 0;
        }
    }
    return 1;
}

static int fixture_finish(ENGINE *e)
{
    (void)e;
    pthread_mutex_lock(&queue_lock);
    int stop = --engine_users == 0;
    pthread_mutex_unlock(&queue_lock);
    if (stop)
        stop_workers(WORKER_COUNT);
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
