/* Batch validation of netmap slots written by an untrusted ring user (netmap.c: the per-slot checks
 * every txsync does before it touches a buffer). */
#include "kernels.h"

int32_t nm_slots_check(const struct nm_slot *slots, uint32_t num_slots, uint32_t first, uint32_t count,
                       uint32_t nbufs, uint32_t buf_size)
{
    uint32_t j = first;

    for (uint32_t i = 0; i < count; i++) {
        const struct nm_slot *s = &slots[j];
        if (s->buf_idx < 2 || s->buf_idx >= nbufs || s->len == 0 || s->len > buf_size)
            return (int32_t)i;
        if (++j == num_slots)
            j = 0;
    }
    return -1;
}
