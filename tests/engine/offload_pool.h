/*
 * offload_pool.h: the accelerator both test fixtures simulate (async_engine/async_engine.c, the
 * ENGINE; async_provider/async_provider.c, the OpenSSL 3 provider): worker threads that run a
 * private-key operation off the caller's thread while the caller's ASYNC_JOB is paused, the way
 * Intel's QAT engine and qatprovider do with their hardware queues. Each fixture keeps its own
 * OpenSSL face (ENGINE method tables, provider dispatch tables) and hands the pool jobs.
 *
 * Theory of operation
 *   - A fixture fills a struct offload_job (its perform function, which says whether the
 *     operation succeeded) and calls offload_pool_run. Inside an ASYNC_JOB (SSL_MODE_ASYNC) the
 *     job is queued for the workers and the caller pauses with ASYNC_pause_job until the work is
 *     done. The job's ASYNC_WAIT_CTX owns one non-blocking eventfd for its whole life (created
 *     on first use, closed by the wait-ctx cleanup when the SSL object is freed); a worker marks
 *     the work done BEFORE writing the eventfd, so a resumed job never finds the fd readable with
 *     nothing done. A spurious resume (the caller retried early) simply pauses again. The job
 *     takes the fd's signal before returning (one read), so no stale readiness is left behind.
 *   - Outside a job (no async mode) the operation runs synchronously on the calling thread.
 *   - Errors raised on a worker land on the worker's error queue: they are cleared there and a
 *     generic error of the fixture's library is raised on the caller's queue instead.
 *   - The workers are pinned to CPU n when the fixture's environment variable (given to
 *     offload_pool_start) says n: the bench puts them on the core the proxy does not use, as an
 *     accelerator sits beside the CPU.
 *   - A "gate" holds the workers back (closed: every submitted job stays paused until it opens),
 *     and counters (offloaded, pauses, jobs in flight and their peak, synchronous) count what the
 *     pool did, so tests prove concurrency with counts instead of timing.
 *
 * Counters: the fixture owns the layout its ctypes readers know. Before including this file it
 * defines `enum counter` with C_OFFLOADED, C_PAUSES, C_IN_FLIGHT, C_PEAK_IN_FLIGHT, C_SYNCHRONOUS
 * among its own names and C_COUNT last; this file defines the `counters` array both use, and
 * offload_pool_counters / offload_pool_reset_counters / offload_pool_set_gate, which the
 * fixture exports under its own prefix.
 *
 * Why one header of static functions and not a .c of its own: each fixture stays one translation
 * unit (one gcc line, its own copy of the pool's state), and nothing of the pool is an exported
 * symbol. Both fixtures can be loaded into one process (the test session loads both); exported
 * pool functions in both libraries could bind one library's calls to the other's copy, and its
 * queue, gate and counters.
 */
#ifndef OFFLOAD_POOL_H
#define OFFLOAD_POOL_H

#ifndef _GNU_SOURCE
#error "define _GNU_SOURCE before any include: the workers' pinning needs CPU_SET and pthread_setaffinity_np"
#endif

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <openssl/async.h>
#include <openssl/err.h>

/* Two: enough for jobs to overlap on the workers, and both fit the one core the bench gives them. */
#define OFFLOAD_POOL_WORKERS 2
/* How long a caller whose ASYNC_pause_job fails blocks on the fd before looking again. */
#define OFFLOAD_POOL_BLOCKING_POLL_MS 100

struct offload_job {
    int (*perform)(struct offload_job *job); /* the operation itself: whether it succeeded */
    int succeeded;                           /* perform's answer, final once done is set */
    int wake_fd;
    atomic_int done;      /* set by the worker once succeeded is final */
    atomic_int signalled; /* set by the worker after writing wake_fd */
    struct offload_job *next;
};

static atomic_llong counters[C_COUNT];

static const char POOL_WAIT_FD_KEY = 0; /* its address keys our fd in each ASYNC_WAIT_CTX */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_changed = PTHREAD_COND_INITIALIZER;
static struct offload_job *pool_head, *pool_tail;
static int pool_gate_open = 1;
static int pool_stopping;
static pthread_t pool_workers[OFFLOAD_POOL_WORKERS];
static int pool_workers_started;

static void offload_pool_counters(long long *out, int count)
{
    for (int i = 0; i < count && i < C_COUNT; i++)
        out[i] = atomic_load(&counters[i]);
}

/* Every counter back to zero except the jobs now in flight, which are still to come back. */
static void offload_pool_reset_counters(void)
{
    for (int i = 0; i < C_COUNT; i++)
        if (i != C_IN_FLIGHT)
            atomic_store(&counters[i], 0);
    atomic_store(&counters[C_PEAK_IN_FLIGHT], atomic_load(&counters[C_IN_FLIGHT]));
}

static void offload_pool_set_gate(int open)
{
    pthread_mutex_lock(&pool_lock);
    pool_gate_open = open;
    pthread_cond_broadcast(&pool_changed);
    pthread_mutex_unlock(&pool_lock);
}

static void pin_worker(const char *cpu_variable)
{
    const char *cpu = getenv(cpu_variable);
    if (cpu == NULL || *cpu == '\0')
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(atoi(cpu), &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *pool_worker_main(void *cpu_variable)
{
    pin_worker(cpu_variable);
    for (;;) {
        pthread_mutex_lock(&pool_lock);
        while (!pool_stopping && (pool_head == NULL || !pool_gate_open))
            pthread_cond_wait(&pool_changed, &pool_lock);
        if (pool_head == NULL) { /* stopping with nothing left */
            pthread_mutex_unlock(&pool_lock);
            return NULL;
        }
        struct offload_job *job = pool_head;
        pool_head = job->next;
        if (pool_head == NULL)
            pool_tail = NULL;
        pthread_mutex_unlock(&pool_lock);

        job->succeeded = job->perform(job);
        if (!job->succeeded)
            ERR_clear_error(); /* this thread's queue; the job raises its own error */
        int fd = job->wake_fd;
        atomic_store(&job->done, 1);
        uint64_t one = 1;
        while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
            ;
        atomic_store(&job->signalled, 1);
    }
}

static void enqueue(struct offload_job *job)
{
    pthread_mutex_lock(&pool_lock);
    job->next = NULL;
    if (pool_tail)
        pool_tail->next = job;
    else
        pool_head = job;
    pool_tail = job;
    pthread_cond_signal(&pool_changed);
    pthread_mutex_unlock(&pool_lock);
}

/* Joins every started worker once the queue is empty. */
static void offload_pool_stop(void)
{
    pthread_mutex_lock(&pool_lock);
    pool_stopping = 1;
    pthread_cond_broadcast(&pool_changed);
    pthread_mutex_unlock(&pool_lock);
    for (int i = 0; i < pool_workers_started; i++)
        pthread_join(pool_workers[i], NULL);
    pool_workers_started = 0;
}

/* Starts the workers not yet running, pinned as `cpu_variable` (a string that lives as long as the
 * library) says. When one cannot start, those started are stopped again and the answer is 0. */
static int offload_pool_start(const char *cpu_variable)
{
    pthread_mutex_lock(&pool_lock);
    pool_stopping = 0;
    pthread_mutex_unlock(&pool_lock);
    for (; pool_workers_started < OFFLOAD_POOL_WORKERS; pool_workers_started++)
        if (pthread_create(&pool_workers[pool_workers_started], NULL, pool_worker_main, (void *)cpu_variable)
            != 0) {
            offload_pool_stop();
            return 0;
        }
    return 1;
}

static void close_wait_fd(ASYNC_WAIT_CTX *ctx, const void *key, OSSL_ASYNC_FD fd, void *custom)
{
    (void)ctx, (void)key, (void)custom;
    close(fd);
}

static int wait_fd_for(ASYNC_JOB *async_job)
{
    ASYNC_WAIT_CTX *ctx = ASYNC_get_wait_ctx(async_job);
    OSSL_ASYNC_FD fd;
    void *custom;
    if (ctx == NULL)
        return -1;
    if (ASYNC_WAIT_CTX_get_fd(ctx, &POOL_WAIT_FD_KEY, &fd, &custom))
        return fd;
    fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (!ASYNC_WAIT_CTX_set_wait_fd(ctx, &POOL_WAIT_FD_KEY, fd, NULL, close_wait_fd)) {
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

/* Runs `job` on a worker while the current ASYNC_JOB pauses, or here when there is none; on a
 * worker's failure raises ERR_R_INTERNAL_ERROR of `error_library` here. Whether it succeeded. */
static int offload_pool_run(struct offload_job *job, int error_library)
{
    ASYNC_JOB *async_job = ASYNC_get_current_job();
    int fd = async_job ? wait_fd_for(async_job) : -1;
    if (fd < 0) {
        atomic_fetch_add(&counters[C_SYNCHRONOUS], 1);
        return job->perform(job);
    }
    job->wake_fd = fd;
    atomic_init(&job->done, 0);
    atomic_init(&job->signalled, 0);
    atomic_fetch_add(&counters[C_OFFLOADED], 1);
    note_in_flight(1);
    enqueue(job);
    /* This wait fd has one writer: our job's worker, once. A read that took a signal after a
     * pause took that write, so the fd is quiet again and nothing is left to drain; a job that
     * found the work done without reading (done before the first pause, or an early resume)
     * takes the signal once it is written. One read per pause, not three. */
    int taken = 0;
    while (!atomic_load(&job->done)) {
        atomic_fetch_add(&counters[C_PAUSES], 1);
        if (!ASYNC_pause_job()) { /* cannot pause: block on the fd instead */
            struct pollfd readable = {.fd = fd, .events = POLLIN};
            poll(&readable, 1, OFFLOAD_POOL_BLOCKING_POLL_MS);
        }
        taken = take_signal(fd);
    }
    while (!atomic_load(&job->signalled))
        sched_yield(); /* the worker is between "done" and its write (job lives on our stack): microseconds */
    if (!taken)
        take_signal(fd);
    note_in_flight(-1);
    if (!job->succeeded)
        ERR_raise(error_library, ERR_R_INTERNAL_ERROR);
    return job->succeeded;
}

#endif
