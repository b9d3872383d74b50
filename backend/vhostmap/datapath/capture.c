/* Live capture taps (see capture.cdef). */
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "refs.h"

static inline uint32_t cap_align(uint32_t n)
{
    return (n + NM_CAP_ALIGN - 1) & ~(uint32_t)(NM_CAP_ALIGN - 1);
}

static inline uint32_t next_slot(const struct nm_bufs *nm, uint32_t i)
{
    return i + 1 == nm->num_slots ? 0 : i + 1;
}

/* Copy `caplen` bytes of the frame in the `nslots` slots from `first`, after its first `skip` bytes (its
 * virtio-net header), to `dst`; zeros where the slots turn out shorter than when they were measured (the
 * ring user rewrote one meanwhile). */
static void tap_copy(uint8_t *dst, const struct nm_bufs *nm, uint32_t first, uint32_t nslots,
                     const struct vq_refs *refs, uint32_t skip, uint32_t caplen)
{
    uint32_t done = 0;
    for (uint32_t k = 0, i = first; k < nslots && done < caplen; k++, i = next_slot(nm, i)) {
        const uint8_t *p;
        uint32_t n = nm_slot_data(nm, &nm->slots[i], refs, &p);
        uint32_t off = skip < n ? skip : n;
        skip -= off;
        p += off;
        n -= off;
        if (n > caplen - done)
            n = caplen - done;
        memcpy(dst + done, p, n);
        done += n;
    }
    memset(dst + done, 0, cap_align(caplen) - done);
}

/* Write the record of one frame at tap->head if it fits in the room `tail` leaves (one wrap record first
 * when it would cross the end). Returns whether it was written. */
static int tap_record(struct nm_tap *tap, const struct nm_bufs *nm, uint32_t first, uint32_t nslots,
                      uint32_t hdr, uint64_t len, const struct vq_refs *refs, uint64_t tail, uint64_t ts_ns)
{
    uint64_t size = tap->size, used = tap->head - tail;
    uint32_t caplen = len < tap->snaplen ? (uint32_t)len : tap->snaplen;
    uint64_t need = sizeof(struct nm_cap_record) + cap_align(caplen);
    uint64_t pos = tap->head & (size - 1);
    uint64_t skip = need > size - pos ? size - pos : 0;
    /* A tail behind by more than the ring (or ahead of head) is the reader's nonsense: no room. */
    if (used > size || skip + need > size - used)
        return 0;
    if (skip) {
        struct nm_cap_record wrap = {ts_ns, NM_CAP_WRAP, 0};
        memcpy(tap->data + pos, &wrap, sizeof wrap);
        pos = 0;
    }
    struct nm_cap_record rec = {ts_ns, caplen, len < UINT32_MAX ? (uint32_t)len : UINT32_MAX};
    memcpy(tap->data + pos, &rec, sizeof rec);
    tap_copy(tap->data + pos + sizeof rec, nm, first, nslots, refs, hdr, caplen);
    tap->head += skip + need;
    return 1;
}

uint32_t nm_tap_stage(struct nm_tap *tap, const struct nm_bufs *nm, uint32_t first, uint32_t count,
                      const struct vq_refs *refs, uint64_t ts_ns)
{
    tap->head = tap->published;
    tap->staged = 0;
    if (first >= nm->num_slots || count > nm->num_slots || tap->size < NM_CAP_ALIGN ||
        (tap->size & (tap->size - 1)))
        return 0;
    uint64_t tail = __atomic_load_n(&tap->ring->tail, __ATOMIC_ACQUIRE);
    uint64_t len = 0;
    uint32_t start = first, nslots = 0, skip = 0;
    for (uint32_t k = 0, i = first; k < count && tap->staged < tap->cap; k++, i = next_slot(nm, i)) {
        const uint8_t *p;
        uint16_t flags = __atomic_load_n(&nm->slots[i].flags, __ATOMIC_RELAXED);
        if (!nslots++)
            skip = flags & NS_VNET_HDR ? VIRTIO_NET_HDR_SIZE : 0; /* what is captured is the frame */
        len += nm_slot_data(nm, &nm->slots[i], refs, &p);
        if (flags & NS_MOREFRAG)
            continue;
        tap_record(tap, nm, start, nslots, skip, len > skip ? len - skip : 0, refs, tail, ts_ns);
        tap->ends[tap->staged] = tap->head;
        tap->slot_ends[tap->staged] = k + 1;
        tap->staged++;
        start = next_slot(nm, i);
        nslots = 0;
        len = 0;
    }
    return tap->staged;
}

uint32_t nm_tap_commit(struct nm_tap *tap, uint32_t slots)
{
    uint64_t head = tap->published;
    uint32_t k = 0;
    for (; k < tap->staged && tap->slot_ends[k] <= slots; k++) {
        if (tap->ends[k] != head)
            tap->frames++;
        else
            tap->dropped++;
        head = tap->ends[k];
    }
    tap->published = tap->head = head;
    tap->staged = 0;
    if (k) {
        __atomic_store_n(&tap->ring->frames, tap->frames, __ATOMIC_RELAXED);
        __atomic_store_n(&tap->ring->dropped, tap->dropped, __ATOMIC_RELAXED);
        __atomic_store_n(&tap->ring->head, head, __ATOMIC_RELEASE);
    }
    return k;
}

uint32_t nm_tap_slots(struct nm_tap *tap, const struct nm_bufs *nm, uint32_t first, uint32_t count,
                      const struct vq_refs *refs)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    nm_tap_stage(tap, nm, first, count, refs, (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec);
    return nm_tap_commit(tap, count);
}
