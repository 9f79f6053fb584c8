/*
 * esvm multithreaded Linux workload: static C (pthreads, C11 atomics, futexes) whose printed
 * results must be the same inside an esvm guest and natively on the host, for any number of
 * threads and any scheduling. It exercises what several vCPUs share: LOCK-prefixed
 * read-modify-writes, compare-exchange retry loops (8 and 16 bytes), futex waits and wakes
 * (pthread mutex and condition variable, and raw futex(2) calls), and a barrier.
 *
 * Work is a fixed number of items (64 x scale). Threads take items from a shared ticket
 * (atomic_fetch_add), so which thread does which item depends on scheduling; each item's
 * result goes to its own slot and the digest folds the slots in order, so it does not.
 * Every item also updates shared counters with atomics; their totals are exact, and a lost
 * update changes them (the program checks them against the values it computes alone and
 * says "check=ok" or "check=FAILED").
 *
 * Output:
 *   mtload threads=<n> cpus=<online CPUs>      (informational; not in the digest)
 *   mt.<counter>=<hex>                         exact totals, independent of <n>
 *   mtload check=ok|FAILED ...                 the totals against a single-threaded model
 *   mtload digest=<hex>                        FNV-1a of the item results and the totals
 *
 * Usage: mtload [threads] [scale]   threads: 1..64, absent or 0: the number of online CPUs;
 *                                   scale: default 1 (the work grows linearly).
 * Exit status 0 when the check passes, 1 when it does not, 2 on a failed system call.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FNV0 0xcbf29ce484222325ULL
#define MAX_THREADS 64
#define ITEMS_PER_SCALE 64
/* Inner steps per item, each with a LOCK XADD on a shared counter. */
#define STEPS 8192
/* Every CAS_EVERY steps: an 8-byte and a 16-byte compare-exchange retry loop. */
#define CAS_EVERY 8
/* Hand-offs through the mutex/condvar ring and the raw-futex ring (per scale). */
#define RING_PASSES 48

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t fold(uint64_t h, uint64_t v) { return fnv(h, &v, sizeof v); }

static void die(const char *what, int err) {
    printf("mtload: %s failed: %s\n", what, strerror(err));
    fflush(stdout);
    exit(2);
}

/* The 8-byte CAS counter's update: any order of the same number of updates gives the same
 * value (it is one function applied over and over), one update fewer gives another. */
static uint64_t lcg(uint64_t x) { return x * 6364136223846793005ULL + 1442695040888963407ULL; }

static int nthreads, items;

/* Shared state. */
static atomic_uint next_item;      /* work ticket */
static atomic_ullong c_xadd;       /* += 1 per step */
static atomic_ullong c_weight;     /* += item + 1 per step (fetch_add of a variable) */
static atomic_ullong c_lcg;        /* lcg() per CAS step, through a compare-exchange loop */
static atomic_uint c_dec;          /* -= 1 per CAS step, 32-bit */
static unsigned __int128 c_pair __attribute__((aligned(16))); /* lo += 1, hi += item */
static uint64_t *result, *result2;

/* Mutex/condvar ring: pass p is made by thread p % nthreads, in order. */
static pthread_mutex_t ring_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ring_cv = PTHREAD_COND_INITIALIZER;
static int ring_turn;
static uint64_t ring_hash = FNV0;
static uint64_t mutex_count; /* plain increments, protected by ring_mu */

/* Raw futex ring: the same with a futex word (the pass number) and FUTEX_WAIT/FUTEX_WAKE. */
static atomic_int fx_turn;
static uint64_t fx_hash = FNV0;

static pthread_barrier_t barrier;

static long futex(atomic_int *uaddr, int op, int val) {
    return syscall(SYS_futex, (int *)uaddr, op, val, NULL, NULL, 0);
}

/* 16-byte compare-exchange loop. GCC 12 makes __atomic_compare_exchange on 16 bytes a
 * libatomic call even with -mcx16 (its lock-free status is left to run time); the legacy
 * __sync builtin with -mcx16 is an inline LOCK CMPXCHG16B. */
static void pair_add(uint64_t hi_add) {
    /* A failed compare-exchange returns the current value: start from a guess. */
    unsigned __int128 old = 0;
    for (;;) {
        uint64_t lo = (uint64_t)old + 1, hi = (uint64_t)(old >> 64) + hi_add;
        unsigned __int128 nv = ((unsigned __int128)hi << 64) | lo;
        unsigned __int128 seen = __sync_val_compare_and_swap(&c_pair, old, nv);
        if (seen == old)
            return;
        old = seen;
    }
}

static uint64_t item_work(unsigned item) {
    uint64_t h = FNV0 ^ item, x = 0x9e3779b97f4a7c15ULL * (item + 1);
    for (int s = 0; s < STEPS; s++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        /* The value a fetch_add returns depends on scheduling: only the total counts. */
        atomic_fetch_add(&c_xadd, 1);
        atomic_fetch_add_explicit(&c_weight, item + 1, memory_order_relaxed);
        if (s % CAS_EVERY == 0) {
            unsigned long long o = atomic_load(&c_lcg);
            while (!atomic_compare_exchange_weak(&c_lcg, &o, lcg(o)))
                ;
            atomic_fetch_sub(&c_dec, 1);
            pair_add(item);
        }
        h = fold(h, x % 1000003);
    }
    return h;
}

static void ring_pass(int self, int passes) {
    for (int p = self; p < passes; p += nthreads) {
        int e = pthread_mutex_lock(&ring_mu);
        if (e)
            die("pthread_mutex_lock", e);
        while (ring_turn != p)
            pthread_cond_wait(&ring_cv, &ring_mu);
        ring_hash = fold(ring_hash, (uint64_t)p * 0x100000001b3ULL + ring_turn);
        mutex_count++;
        ring_turn++;
        pthread_cond_broadcast(&ring_cv);
        pthread_mutex_unlock(&ring_mu);
    }
}

static void futex_pass(int self, int passes) {
    for (int p = self; p < passes; p += nthreads) {
        int cur;
        while ((cur = atomic_load(&fx_turn)) != p) {
            /* Sleeps only while the word still holds `cur` (EAGAIN otherwise). */
            if (futex(&fx_turn, FUTEX_WAIT_PRIVATE, cur) != 0 && errno != EAGAIN &&
                errno != EINTR)
                die("futex wait", errno);
        }
        fx_hash = fold(fx_hash, (uint64_t)p * 31 + 7);
        atomic_store(&fx_turn, p + 1);
        if (futex(&fx_turn, FUTEX_WAKE_PRIVATE, INT_MAX) < 0)
            die("futex wake", errno);
    }
}

static void *thread_main(void *arg) {
    int self = (int)(intptr_t)arg;
    /* Phase 1: items from the shared ticket. */
    for (;;) {
        unsigned i = atomic_fetch_add(&next_item, 1);
        if (i >= (unsigned)items)
            break;
        result[i] = item_work(i);
    }
    int e = pthread_barrier_wait(&barrier);
    if (e != 0 && e != PTHREAD_BARRIER_SERIAL_THREAD)
        die("pthread_barrier_wait", e);
    /* Phase 2: needs every phase-1 slot (the barrier's job); strided, a fixed split. */
    for (int i = self; i < items; i += nthreads)
        result2[i] = fold(result[i], result[(i + 1) % items]) ^ result[(i + items - 1) % items];
    /* Phase 3: the two rings, hand-offs in a fixed order whatever the thread count. */
    int passes = RING_PASSES * (items / ITEMS_PER_SCALE);
    ring_pass(self, passes);
    futex_pass(self, passes);
    return NULL;
}

int main(int argc, char **argv) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    nthreads = argc > 1 ? atoi(argv[1]) : 0;
    if (nthreads < 1)
        nthreads = cpus > 0 ? (int)cpus : 1;
    if (nthreads > MAX_THREADS)
        nthreads = MAX_THREADS;
    int scale = argc > 2 ? atoi(argv[2]) : 1;
    if (scale < 1)
        scale = 1;
    items = ITEMS_PER_SCALE * scale;
    result = calloc((size_t)items, sizeof *result);
    result2 = calloc((size_t)items, sizeof *result2);
    if (!result || !result2)
        die("calloc", ENOMEM);
    atomic_store(&c_dec, 0xffffffffu);
    int e = pthread_barrier_init(&barrier, NULL, (unsigned)nthreads);
    if (e)
        die("pthread_barrier_init", e);
    printf("mtload threads=%d cpus=%ld\n", nthreads, cpus);
    fflush(stdout);

    pthread_t tid[MAX_THREADS];
    for (int t = 1; t < nthreads; t++) {
        e = pthread_create(&tid[t], NULL, thread_main, (void *)(intptr_t)t);
        if (e)
            die("pthread_create", e);
    }
    thread_main((void *)0);
    for (int t = 1; t < nthreads; t++) {
        e = pthread_join(tid[t], NULL);
        if (e)
            die("pthread_join", e);
    }

    /* What the counters must hold, computed alone. */
    uint64_t steps = (uint64_t)items * STEPS, cas_steps = (uint64_t)items * (STEPS / CAS_EVERY);
    uint64_t want_weight = 0, want_hi = 0, want_lcg = 0;
    for (int i = 0; i < items; i++) {
        want_weight += (uint64_t)(i + 1) * STEPS;
        want_hi += (uint64_t)i * (STEPS / CAS_EVERY);
    }
    for (uint64_t k = 0; k < cas_steps; k++)
        want_lcg = lcg(want_lcg);
    uint32_t want_dec = 0xffffffffu - (uint32_t)cas_steps;
    int passes = RING_PASSES * scale;

    uint64_t lo = (uint64_t)c_pair, hi = (uint64_t)(c_pair >> 64);
    struct {
        const char *name;
        uint64_t got, want;
    } counters[] = {
        {"xadd", atomic_load(&c_xadd), steps},
        {"weight", atomic_load(&c_weight), want_weight},
        {"cas", atomic_load(&c_lcg), want_lcg},
        {"dec32", atomic_load(&c_dec), want_dec},
        {"cas16lo", lo, cas_steps},
        {"cas16hi", hi, want_hi},
        {"mutex", mutex_count, (uint64_t)passes},
        {"futex", (uint64_t)atomic_load(&fx_turn), (uint64_t)passes},
    };
    uint64_t all = FNV0;
    for (int i = 0; i < items; i++) {
        all = fold(all, result[i]);
        all = fold(all, result2[i]);
    }
    all = fold(all, ring_hash);
    all = fold(all, fx_hash);
    int bad = 0;
    for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++) {
        printf("mt.%s=%016llx\n", counters[i].name, (unsigned long long)counters[i].got);
        all = fold(all, counters[i].got);
        if (counters[i].got != counters[i].want) {
            printf("mtload check=FAILED %s is %llx, not %llx\n", counters[i].name,
                   (unsigned long long)counters[i].got, (unsigned long long)counters[i].want);
            bad = 1;
        }
    }
    if (!bad)
        printf("mtload check=ok\n");
    printf("mtload digest=%016llx\n", (unsigned long long)all);
    fflush(stdout);
    return bad;
}
