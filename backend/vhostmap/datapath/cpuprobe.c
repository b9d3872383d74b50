/* A core-to-core round trip of one cache line (see cpuprobe.cdef). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>

#include "kernels.h"

/* Loads of the line between two yields while waiting for the other thread. A transfer takes well under a
 * microsecond, a few hundred loads at most: the limit is only reached when the other thread is not running
 * (its vCPU preempted by the host, its CPU busy with another task), and then yielding lets that task run. */
#define CPUPROBE_SPIN_LIMIT 4096

struct cpuprobe {
    /* The line the threads hand to and fro, alone in its 128 bytes: the adjacent-line prefetcher fetches
     * lines in pairs, and nothing else may share or neighbour it. Odd values are cpu_a's, even ones cpu_b's. */
    _Alignas(128) uint64_t line;
    char pad[128 - sizeof(uint64_t)];
    /* Round trips, the warm-up's included: read-only while the threads run, except when the second thread
     * could not start (the first one's loop is then cut short: atomic). */
    uint64_t total;
    uint32_t spin_limit;
    double ns;
};

/* Spin until the line holds `want`. */
static void cpuprobe_wait(struct cpuprobe *p, uint64_t want)
{
    uint32_t spins = 0;
    while (__atomic_load_n(&p->line, __ATOMIC_ACQUIRE) != want) {
        if (++spins >= p->spin_limit) {
            sched_yield();
            spins = 0;
        }
    }
}

static double cpuprobe_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* cpu_a's thread: writes each round trip's odd value, waits for the even answer, and times the round trips
 * after the warm-up. */
static void *cpuprobe_ping(void *arg)
{
    struct cpuprobe *p = arg;
    double start = 0;
    for (uint64_t i = 1; i <= p->total; i++) {
        if (i == VHU_CPUPROBE_WARMUP + 1)
            start = cpuprobe_now_ns();
        __atomic_store_n(&p->line, 2 * i - 1, __ATOMIC_RELEASE);
        cpuprobe_wait(p, 2 * i);
    }
    p->ns = (cpuprobe_now_ns() - start) / (double)(p->total - VHU_CPUPROBE_WARMUP);
    return NULL;
}

/* cpu_b's thread: answers each odd value with the next even one. */
static void *cpuprobe_pong(void *arg)
{
    struct cpuprobe *p = arg;
    for (uint64_t i = 1; i <= __atomic_load_n(&p->total, __ATOMIC_RELAXED); i++) {
        cpuprobe_wait(p, 2 * i - 1);
        __atomic_store_n(&p->line, 2 * i, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Start `fn` on a thread pinned to `cpu` from its first instruction (no migration after it started). */
static int cpuprobe_start(pthread_t *t, int32_t cpu, void *(*fn)(void *), struct cpuprobe *p)
{
    pthread_attr_t attr;
    cpu_set_t set;
    int err = pthread_attr_init(&attr);
    if (err)
        return err;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    err = pthread_attr_setaffinity_np(&attr, sizeof set, &set);
    if (!err)
        err = pthread_create(t, &attr, fn, p);
    pthread_attr_destroy(&attr);
    return err;
}

int32_t vhu_cpu_round_trip(int32_t cpu_a, int32_t cpu_b, uint32_t round_trips, double *ns)
{
    if (cpu_a < 0 || cpu_a >= CPU_SETSIZE || cpu_b < 0 || cpu_b >= CPU_SETSIZE || round_trips == 0)
        return EINVAL;
    struct cpuprobe p = {
        .line = 0,
        .total = (uint64_t)round_trips + VHU_CPUPROBE_WARMUP,
        /* On one CPU the other thread cannot run while this one spins: yield at once. */
        .spin_limit = cpu_a == cpu_b ? 1 : CPUPROBE_SPIN_LIMIT,
        .ns = 0,
    };
    pthread_t pong, ping;
    int err = cpuprobe_start(&pong, cpu_b, cpuprobe_pong, &p);
    if (err)
        return err;
    err = cpuprobe_start(&ping, cpu_a, cpuprobe_ping, &p);
    if (err) {
        /* The answering thread waits for a first value that will never come: give it that one, with no
         * round trip after it (its loop then ends). */
        __atomic_store_n(&p.total, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&p.line, 1, __ATOMIC_RELEASE);
        pthread_join(pong, NULL);
        return err;
    }
    pthread_join(ping, NULL);
    pthread_join(pong, NULL);
    *ns = p.ns;
    return 0;
}
