/* Guarded eventfd signalling (see eventfd.cdef). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels.h"

/* SIGRTMAX is a function call in glibc, not a constant. */
#define GUARD_SIGNAL (SIGRTMAX - 1)

static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static pthread_key_t guard_key;
static int guard_usable;
/* 0: this thread has not tried yet; 1: it has its timer; -1: it cannot have one. */
static __thread int guard_state;
static __thread timer_t guard_timer;
/* Whether the timer runs now, and whether the thread asked to keep it running between writes. */
static __thread int guard_armed;
static __thread int guard_held;

static void guard_handler(int signo)
{
    /* Nothing to do: being delivered is the point, as it makes the sleeping write() return EINTR. */
    (void)signo;
}

static void guard_destroy(void *p)
{
    /* A thread's timer goes with the thread (pthread key destructor). */
    timer_delete(*(timer_t *)p);
    free(p);
}

static void guard_init(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = guard_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: the interrupted write must return, not resume sleeping */
    guard_usable = sigaction(GUARD_SIGNAL, &sa, NULL) == 0 && pthread_key_create(&guard_key, guard_destroy) == 0;
}

static int guard_thread(void)
{
    if (guard_state)
        return guard_state > 0;
    pthread_once(&guard_once, guard_init);
    guard_state = -1;
    if (!guard_usable)
        return 0;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, GUARD_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = GUARD_SIGNAL;
    sev._sigev_un._tid = gettid(); /* sigev_notify_thread_id, which older glibc headers lack */
    timer_t *t = malloc(sizeof *t);
    if (!t)
        return 0;
    if (timer_create(CLOCK_MONOTONIC, &sev, t) != 0) {
        free(t);
        return 0;
    }
    if (pthread_setspecific(guard_key, t) != 0) {
        timer_delete(*t);
        free(t);
        return 0;
    }
    guard_timer = *t;
    guard_state = 1;
    return 1;
}

int32_t vhu_eventfd_guard_signal(void)
{
    return GUARD_SIGNAL;
}

int32_t vhu_eventfd_guarded(void)
{
    return guard_thread();
}

void vhu_eventfd_guard_disarm(void)
{
    static const struct itimerspec disarm = {{0, 0}, {0, 0}};
    if (guard_armed) {
        timer_settime(guard_timer, 0, &disarm, NULL);
        guard_armed = 0;
    }
}

void vhu_eventfd_guard_hold(int32_t hold)
{
    guard_held = hold != 0;
    if (!guard_held)
        vhu_eventfd_guard_disarm();
}

int32_t vhu_eventfd_signal(int32_t fd)
{
    static const uint64_t one = 1;
    static const struct itimerspec arm = {
        .it_interval = {0, VHU_EVENTFD_GUARD_NS},
        .it_value = {0, VHU_EVENTFD_GUARD_NS},
    };
    if (guard_thread() && !guard_armed)
        guard_armed = timer_settime(guard_timer, 0, &arm, NULL) == 0;
    if (!guard_armed) {
        struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
        if (poll(&p, 1, 0) < 0 || (p.revents & POLLNVAL))
            return VHU_EVENTFD_FAILED;
        if (!(p.revents & POLLOUT))
            return VHU_EVENTFD_FULL;
    }
    ssize_t r = write(fd, &one, sizeof one);
    int err = errno;
    if (!guard_held)
        vhu_eventfd_guard_disarm();
    if (r == (ssize_t)sizeof one)
        return VHU_EVENTFD_OK;
    if (r < 0 && err == EAGAIN)
        return VHU_EVENTFD_FULL;
    /* A write to an eventfd only sleeps when the counter is full and O_NONBLOCK is clear: EINTR means the
     * guard had to wake it. */
    if (r < 0 && err == EINTR)
        return VHU_EVENTFD_BLOCKED;
    return VHU_EVENTFD_FAILED;
}
