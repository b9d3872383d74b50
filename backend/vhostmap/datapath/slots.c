/* Batch validation of netmap slots written by an untrusted ring user (netmap.c: the per-slot checks
 * every txsync/rxsync does before it touches a buffer). The reference is slots_check_reference in
 * vhostmap/netmap/kring.py. */
#include "kernels.h"

int32_t nm_slots_check(const struct nm_slot *slots, uint32_t num_slots, uint32_t first, uint32_t count,
                       uint32_t nbufs, uint32_t min_len, uint32_t max_len)
{
    uint32_t j = first;

    if (first >= num_slots || count > num_slots)
        return -2;
    for (uint32_t i = 0; i < count; i++) {
        const struct nm_slot *s = &slots[j];
        /* Read each field once: the ring user may be writing the slot while we look at it. */
        uint32_t buf_idx = __atomic_load_n(&s->buf_idx, __ATOMIC_RELAXED);
        uint32_t len = __atomic_load_n(&s->len, __ATOMIC_RELAXED);
        if (buf_idx < NM_RESERVED_BUFS || buf_idx >= nbufs || len < min_len || len > max_len)
            return (int32_t)i;
        if (++j == num_slots)
            j = 0;
    }
    return -1;
}
