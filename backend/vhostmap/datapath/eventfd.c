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
/* Whether the timer runs now, whether the thread asked to keep it running between writes, and whether it is
 * inside vhu_eventfd_signal. The handler runs on this thread (SIGEV_THREAD_ID) and reads or clears them
 * between any two instructions: volatile, and signal fences where the order matters. */
static __thread volatile sig_atomic_t guard_armed;
static __thread int guard_held;
static __thread volatile sig_atomic_t guard_in_write;
static __thread volatile uint32_t guard_expiries;

static void guard_handler(int signo)
{
    /* Being delivered is the point: it makes a sleeping write() return EINTR. An expiry outside a write means
     * the writes are over for now (a held guard between bursts, or a polling thread that never sleeps, which
     * used to take one signal per period for ever): disarm; the next write arms again. timer_settime is
     * async-signal-safe. */
    (void)signo;
    int saved_errno = errno;
    guard_expiries = guard_expiries + 1;
    if (!guard_in_write && guard_armed) {
        static const struct itimerspec disarm = {{0, 0}, {0, 0}};
        timer_settime(guard_timer, 0, &disarm, NULL);
        guard_armed = 0;
    }
    errno = saved_errno;
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

int32_t vhu_eventfd_guard_armed(void)
{
    struct itimerspec now;
    if (guard_state <= 0 || timer_gettime(guard_timer, &now) != 0)
        return 0;
    return now.it_value.tv_sec != 0 || now.it_value.tv_nsec != 0;
}

uint32_t vhu_eventfd_guard_expiries(void)
{
    return guard_expiries;
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
    int guarded = guard_thread();
    /* In the write from here on: an expiry leaves the timer armed. Set before looking at guard_armed, so that
     * an expiry in between cannot disarm a timer this write counts on. */
    guard_in_write = 1;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    if (guarded && !guard_armed)
        guard_armed = timer_settime(guard_timer, 0, &arm, NULL) == 0;
    if (!guard_armed) {
        struct pollfd p = {.fd = fd, .events = POLLOUT, .revents = 0};
        int bad = poll(&p, 1, 0) < 0 || (p.revents & POLLNVAL);
        if (bad || !(p.revents & POLLOUT)) {
            guard_in_write = 0;
            return bad ? VHU_EVENTFD_FAILED : VHU_EVENTFD_FULL;
        }
    }
    ssize_t r = write(fd, &one, sizeof one);
    int err = errno;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    guard_in_write = 0;
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
