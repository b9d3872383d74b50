/* SIGBUS containment for guest memory (see guard.cdef).
 *
 * Why replace the mapping rather than siglongjmp out of the faulting kernel: a fault can happen in Python too
 * (the reference datapath, the used ring written by SplitVirtqueue.flush_used, GET_VRING_BASE reading
 * used->idx), and no jump may cross the interpreter's frames. Mapping zero pages over the dead region at the
 * faulting address makes the access complete wherever it came from; the kernels were written for a driver
 * that rewrites guest memory under them at any moment, so reading zeros from there on leaves their state as
 * consistent as any other hostile input does, and the `gone` word stops the port at the end of the call.
 *
 * Everything the handler touches is async-signal-safe: atomics on a static table, mmap (a plain system call
 * on Linux), sigaction and raise. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>

#include "kernels.h"

/* A slot's life: FREE -> CLAIMED (fields being written, the handler ignores it) -> LIVE -> CLAIMED -> FREE. */
enum { SLOT_FREE = 0, SLOT_CLAIMED = 1, SLOT_LIVE = 2 };

struct vm_guard_slot {
    uint32_t life;
    uint32_t state; /* VM_GUARD_* */
    uint64_t start;
    uint64_t len;
    uint32_t *gone;
};

static struct vm_guard_slot vm_guard_slots[VM_GUARD_MAX];
static struct sigaction vm_guard_previous;
static int vm_guard_passed_on;
static pthread_mutex_t vm_guard_lock = PTHREAD_MUTEX_INITIALIZER;

/* Not a fault in guest memory: give the signal to whoever had it before us, once. A fault returns and runs
 * the instruction again, which faults again under that action with its own siginfo (faulthandler prints
 * its traceback, the default action dumps core); a signal sent with kill() or raise() is raised again (it
 * is blocked in this handler and arrives when it returns). If the signal comes back here after being passed
 * on (faulthandler restores the handler it replaced, which may be this one, and raises again), the default
 * action takes it: a real bug must end the process, never loop. */
static void vm_guard_pass_on(int sig, const siginfo_t *si)
{
    if (__atomic_exchange_n(&vm_guard_passed_on, 1, __ATOMIC_SEQ_CST)) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL);
    } else {
        sigaction(sig, &vm_guard_previous, NULL);
    }
    if (si->si_code <= 0)
        raise(sig);
}

/* Replace the mapping of `s` with zero pages, once; 0 when the access may be retried. */
static int vm_guard_replace(struct vm_guard_slot *s)
{
    uint32_t expected = VM_GUARD_INTACT;
    if (!__atomic_compare_exchange_n(&s->state, &expected, VM_GUARD_REPLACING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        /* Another thread is replacing it (this access faults again until it is done) or did. */
        return expected == VM_GUARD_FAILED ? -1 : 0;
    /* Private, never reserved: what the rest of the batch writes there goes nowhere and costs no commit. */
    void *p = mmap((void *)(uintptr_t)s->start, s->len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        __atomic_store_n(&s->state, VM_GUARD_FAILED, __ATOMIC_RELEASE);
        return -1;
    }
    __atomic_store_n(&s->state, VM_GUARD_REPLACED, __ATOMIC_RELEASE);
    uint32_t *gone = s->gone; /* NULL only if the slot is being removed under us */
    if (gone)
        __atomic_store_n(gone, 1, __ATOMIC_RELEASE);
    return 0;
}

static void vm_guard_handler(int sig, siginfo_t *si, void *context)
{
    (void)context;
    int saved_errno = errno;
    /* BUS_ADRERR is an access past the end of a mapped file; a hardware memory error (BUS_MCEERR_*) or an
     * alignment fault is not ours to hide. */
    if (si->si_code == BUS_ADRERR) {
        uintptr_t addr = (uintptr_t)si->si_addr;
        for (uint32_t i = 0; i < VM_GUARD_MAX; i++) {
            struct vm_guard_slot *s = &vm_guard_slots[i];
            if (__atomic_load_n(&s->life, __ATOMIC_ACQUIRE) != SLOT_LIVE || addr - s->start >= s->len)
                continue;
            if (vm_guard_replace(s) == 0) {
                errno = saved_errno;
                return;
            }
            break;
        }
    }
    vm_guard_pass_on(sig, si);
    errno = saved_errno;
}

int32_t vm_guard_install(void)
{
    struct sigaction current, ours;
    int32_t installed = -1;
    pthread_mutex_lock(&vm_guard_lock);
    if (sigaction(SIGBUS, NULL, &current) != 0)
        goto out;
    installed = 0;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == vm_guard_handler)
        goto out;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = vm_guard_handler;
    /* SA_ONSTACK as faulthandler asks for its own: harmless without an alternate stack. No SA_NODEFER: a
     * second SIGBUS inside the handler would be a bug in it, and the default action must take that. */
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    vm_guard_previous = current;
    __atomic_store_n(&vm_guard_passed_on, 0, __ATOMIC_SEQ_CST);
    installed = sigaction(SIGBUS, &ours, NULL) == 0 ? 1 : -1;
out:
    pthread_mutex_unlock(&vm_guard_lock);
    return installed;
}

int32_t vm_guard_add(uint64_t start, uint64_t len, uint32_t *gone)
{
    for (int32_t i = 0; i < VM_GUARD_MAX; i++) {
        struct vm_guard_slot *s = &vm_guard_slots[i];
        uint32_t expected = SLOT_FREE;
        if (!__atomic_compare_exchange_n(&s->life, &expected, SLOT_CLAIMED, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED))
            continue;
        s->start = start;
        s->len = len;
        s->gone = gone;
        s->state = VM_GUARD_INTACT;
        __atomic_store_n(&s->life, SLOT_LIVE, __ATOMIC_RELEASE);
        return i;
    }
    return -1;
}

void vm_guard_remove(int32_t slot)
{
    if (slot < 0 || slot >= VM_GUARD_MAX)
        return;
    struct vm_guard_slot *s = &vm_guard_slots[slot];
    __atomic_store_n(&s->life, SLOT_CLAIMED, __ATOMIC_RELEASE);
    s->start = s->len = 0;
    s->gone = NULL;
    __atomic_store_n(&s->life, SLOT_FREE, __ATOMIC_RELEASE);
}

uint32_t vm_guard_state(int32_t slot)
{
    if (slot < 0 || slot >= VM_GUARD_MAX)
        return VM_GUARD_INTACT;
    return __atomic_load_n(&vm_guard_slots[slot].state, __ATOMIC_ACQUIRE);
}
