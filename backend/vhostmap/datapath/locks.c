/* Short spin locks between datapath threads (see locks.cdef). */
#include <sched.h>

#include "kernels.h"

void vhu_lock(uint32_t *lock)
{
    if (!lock)
        return;
    unsigned spins = 0;
    while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(lock, __ATOMIC_RELAXED)) {
            /* Held for one ring's batch: spin a little, then let the holder run (it may share our core, or
             * be a Python path holding it between two calls). */
            if (++spins < 256) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            } else {
                sched_yield();
            }
        }
    }
}

void vhu_unlock(uint32_t *lock)
{
    if (lock)
        __atomic_store_n(lock, 0, __ATOMIC_RELEASE);
}
