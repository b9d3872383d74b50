/* The vhost-user dirty log (docs/interop/vhost-user.rst, "Migration"): one bit per VHOST_LOG_PAGE of
 * guest-physical memory, set with atomic ORs because the front-end harvests the bitmap while we write it.
 * The reference is log_dirty_reference in vhostmap/vhost_user/memory.py. */
#include "kernels.h"

static void log_or(uint8_t *byte, uint8_t mask)
{
    __atomic_fetch_or(byte, mask, __ATOMIC_RELAXED);
}

uint64_t vm_log_dirty(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        return 0;
    uint64_t last_addr = gpa + (len - 1);
    if (last_addr < gpa) /* wrapped past 2^64 */
        last_addr = UINT64_MAX;
    uint64_t first = gpa / VHOST_LOG_PAGE;
    uint64_t last = last_addr / VHOST_LOG_PAGE;
    uint64_t npages = log_size * 8; /* log_size is the size of a mapping, far below 2^61 */
    uint64_t missed = 0;

    if (last >= npages) {
        missed = last - (first > npages ? first : npages) + 1;
        if (first >= npages)
            return missed;
        last = npages - 1;
    }
    /* The guest data written before this call must be visible before its dirty bit: the front-end copies a
     * page after it sees (and clears) the bit, and must not copy the old contents. */
    __atomic_thread_fence(__ATOMIC_RELEASE);

    uint64_t first_byte = first / 8, last_byte = last / 8;
    if (first_byte == last_byte) {
        log_or(&log[first_byte], (uint8_t)((0xFFu << (first % 8)) & (0xFFu >> (7 - last % 8))));
        return missed;
    }
    log_or(&log[first_byte], (uint8_t)(0xFFu << (first % 8)));
    for (uint64_t b = first_byte + 1; b < last_byte; b++)
        log_or(&log[b], 0xFF);
    log_or(&log[last_byte], (uint8_t)(0xFFu >> (7 - last % 8)));
    return missed;
}
