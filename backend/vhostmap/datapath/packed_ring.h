/* Packed virtqueues (virtio 1.x spec 2.8): the device side of the ring, as static inline functions shared by
 * packed.c (the per-operation entry points, vqp_*) and virtio.c (the batch kernels over a packed ring,
 * vqp_dequeue / vqp_enqueue, compiled from ring_batch.h). Not a .cdef: cffi needs none of it.
 *
 * Everything in the ring belongs to an untrusted driver that may change it while we look: a descriptor's flags
 * are read once with an acquire load (what the driver wrote before them is visible after them), the rest of it
 * is copied out once, checked, and used from the copy; every guest-physical address goes through vm_translate
 * (virtio.c), the one translation; buffer ids are checked against the queue size and the ids in flight.
 */
#ifndef VHOSTMAP_PACKED_RING_H
#define VHOSTMAP_PACKED_RING_H

#include <string.h>

#include "kernels.h"
#include "virtio_shared.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x rings are little-endian and read natively here"
#endif

/* struct pvirtq_desc (VRING_PACKED_DESC in vhostmap/virtio/spec.py). */
struct pvirtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};
#define PVQ_DESC_SIZE 16
#define PVQ_LEN_OFFSET 8
#define PVQ_ID_OFFSET 12
#define PVQ_FLAGS_OFFSET 14
#define PVQ_EVENT_FLAGS_OFFSET 2
#define PVQ_EVENT_SIZE 4
#define PVQ_WRAP_SHIFT 15
#ifndef VQ_NOT_STORED
#define VQ_NOT_STORED UINT32_MAX
#endif

/* A batch: four descriptors, one cache line of a ring the driver aligned (DPDK's PACKED_BATCH_SIZE, for the
 * same reason): pvq_pop_batch takes four chains at once, pvq_pending_upto counts four at once. */
#define PVQ_BATCH 4

static inline uint16_t *pvq_word(uint8_t *base, size_t offset)
{
    return (uint16_t *)(void *)(base + offset);
}

/* The flags of descriptor `pos`: one load, acquire (the driver writes a chain's head flags last). */
static inline uint16_t pvq_flags(const struct vq_packed *vq, uint32_t pos)
{
    return __atomic_load_n(pvq_word(vq->desc, (size_t)pos * PVQ_DESC_SIZE + PVQ_FLAGS_OFFSET), __ATOMIC_ACQUIRE);
}

/* packed.is_available: AVAIL equals the wrap counter, USED differs from it. */
static inline int pvq_available(uint16_t flags, uint8_t wrap)
{
    return !!(flags & VRING_PACKED_DESC_F_AVAIL_MASK) == wrap && !!(flags & VRING_PACKED_DESC_F_USED_MASK) != wrap;
}

/* packed.used_flags. */
static inline uint16_t pvq_used_flags(uint8_t wrap, int written)
{
    return (uint16_t)((wrap ? VRING_PACKED_DESC_F_AVAIL_MASK | VRING_PACKED_DESC_F_USED_MASK : 0) |
                      (written ? VRING_DESC_F_WRITE : 0));
}

static inline void pvq_step(const struct vq_packed *vq, uint32_t *pos, uint8_t *wrap)
{
    if (++*pos == vq->num) {
        *pos = 0;
        *wrap ^= 1;
    }
}

/* A copy of entry `i` of `table`; every check and use looks at the copy (the barrier keeps the compiler from
 * reading guest memory again for a field). Tables need not be aligned, hence memcpy. */
static inline struct pvirtq_desc pvq_load_desc(const uint8_t *table, uint32_t i)
{
    struct pvirtq_desc d;
    memcpy(&d, table + (size_t)i * PVQ_DESC_SIZE, sizeof d);
    __asm__ __volatile__("" ::: "memory");
    return d;
}

static inline int32_t pvq_fail(struct vq_batch *out, int32_t status, uint32_t desc, uint32_t entry)
{
    out->status = status;
    out->err_desc = desc;
    out->err_slot = entry; /* 0: the ring descriptor itself; e + 1: entry e of its indirect table */
    return status;
}

/* The chains available from last_avail_idx, counted up to `max`: a packed ring has no index to read, so
 * counting means reading each chain's flags, lines the driver's core wrote; a batch kernel counts no further
 * than the next multiple of PVQ_BATCH at a time (virtio.c) rather than the whole ring. */
static inline uint32_t pvq_pending_upto(const struct vq_packed *vq, uint32_t max)
{
    if (!vq->desc || !vq->num || vq->num > 32768 || vq->last_avail_idx >= vq->num)
        return 0;
    uint32_t pos = vq->last_avail_idx, chains = 0, seen = 0;
    uint8_t wrap = vq->avail_wrap_counter;
    while (seen < vq->num && chains < max) {
        /* The four descriptors of a line at once when each is a whole chain available (what the loop below
         * finds one by one in them: four chains, four descriptors): a stash's count of a full ring (vhost_sync.c)
         * reads every flag of it. */
        if (!(pos % PVQ_BATCH) && pos + PVQ_BATCH <= vq->num && vq->num - seen >= PVQ_BATCH &&
            max - chains >= PVQ_BATCH) {
            /* Available with wrap counter `wrap` and no NEXT: AVAIL, USED and NEXT exactly these. */
            const uint16_t mask = VRING_PACKED_DESC_F_AVAIL_MASK | VRING_PACKED_DESC_F_USED_MASK | VRING_DESC_F_NEXT;
            const uint16_t want = wrap ? VRING_PACKED_DESC_F_AVAIL_MASK : VRING_PACKED_DESC_F_USED_MASK;
            uint16_t differ = 0;
            for (uint32_t k = 0; k < PVQ_BATCH; k++)
                differ |= (uint16_t)((pvq_flags(vq, pos + k) & mask) ^ want);
            if (!differ) {
                chains += PVQ_BATCH;
                seen += PVQ_BATCH;
                pos += PVQ_BATCH;
                if (pos == vq->num) {
                    pos = 0;
                    wrap ^= 1;
                }
                continue;
            }
        }
        uint16_t flags = pvq_flags(vq, pos);
        if (!pvq_available(flags, wrap))
            break;
        chains++;
        /* The rest of the chain: NEXT on every descriptor but its last. */
        while ((flags & VRING_DESC_F_NEXT) && seen < vq->num) {
            seen++;
            pvq_step(vq, &pos, &wrap);
            flags = pvq_flags(vq, pos);
        }
        seen++;
        pvq_step(vq, &pos, &wrap);
    }
    return chains;
}

static inline uint32_t pvq_pending(const struct vq_packed *vq)
{
    return pvq_pending_upto(vq, UINT32_MAX);
}

/* `n` descriptors on from *pos (its wrap counter in *wrap) in a ring of `num`. Less than a lap (a chain, or
 * the chains in flight together) without a division, which cost more than the rest of a chain's bookkeeping. */
static inline void pvq_skip_in(uint32_t num, uint32_t *pos, uint8_t *wrap, uint32_t n)
{
    if (__builtin_expect(n < num, 1)) {
        *pos += n;
    } else {
        *pos += n % num;
        *wrap ^= (uint8_t)(n / num & 1);
    }
    if (*pos >= num) {
        *pos -= num;
        *wrap ^= 1;
    }
}

static inline void pvq_skip(const struct vq_packed *vq, uint32_t *pos, uint8_t *wrap, uint32_t n)
{
    pvq_skip_in(vq->num, pos, wrap, n);
}

/* PackedVirtqueue._check_direction. */
static inline int pvq_direction_ok(uint16_t flags, int32_t writable)
{
    return !!(flags & VRING_DESC_F_WRITE) == !!writable;
}

/* PackedVirtqueue._walk_indirect: the entries of the table descriptor `pos` refers to, each a buffer. */
static inline int32_t pvq_walk_indirect(const struct vq_packed *vq, const struct vm_memory *mem, uint32_t pos,
                                 const struct pvirtq_desc *d, int32_t writable, struct vq_seg *segs, uint32_t cap,
                                 uint32_t *nseg, uint64_t *total, struct vq_batch *out)
{
    if (d->len == 0 || d->len % PVQ_DESC_SIZE || d->len / PVQ_DESC_SIZE > VQ_MAX_CHAIN_LENGTH) {
        out->err_value = d->len;
        return pvq_fail(out, VQ_ERR_INDIRECT_LEN, pos, 0);
    }
    const uint8_t *table = vm_translate(mem, d->addr, d->len, &out->fault);
    if (!table)
        return pvq_fail(out, VQ_ERR_INDIRECT_MEM, pos, 0);
    (void)vq;
    for (uint32_t e = 0; e < d->len / PVQ_DESC_SIZE; e++) {
        struct pvirtq_desc b = pvq_load_desc(table, e);
        if (b.flags & VRING_DESC_F_INDIRECT)
            return pvq_fail(out, VQ_ERR_NESTED_INDIRECT, pos, e + 1);
        if (!pvq_direction_ok(b.flags, writable))
            return pvq_fail(out, VQ_ERR_DIRECTION, pos, e + 1);
        if (b.len) {
            uint8_t *host = vm_translate(mem, b.addr, b.len, &out->fault);
            if (!host)
                return pvq_fail(out, VQ_ERR_BUFFER_MEM, pos, e + 1);
            if (*nseg < cap)
                segs[*nseg] = (struct vq_seg){host, b.addr, b.len};
            (*nseg)++;
            *total += b.len;
        }
    }
    return VQ_OK;
}

/* PackedVirtqueue.pop's walk of the chain at ring position `head` (its wrap counter `wrap`), every check
 * of the reference in its order but the buffer id's: up to `cap` segments in `segs`, and in *chain its
 * length, segments, id and descriptors (pos and wrap: where it started). Nothing is taken. VQ_OK or the
 * fault. A batch walks a chain it took again with it (pvq_rewalk). */
static inline int32_t pvq_walk(const struct vq_packed *vq, const struct vm_memory *mem, uint32_t head, uint8_t wrap,
                               int32_t writable, struct vq_seg *segs, uint32_t cap, struct vqp_chain *chain,
                               struct vq_batch *out)
{
    uint32_t pos = head, nseg = 0;
    uint32_t limit = vq->num < VQ_MAX_CHAIN_LENGTH ? vq->num : VQ_MAX_CHAIN_LENGTH;
    uint8_t start_wrap = wrap;
    uint64_t total = 0;
    uint16_t id;
    uint32_t ndesc;
    for (ndesc = 1;; ndesc++) {
        if (ndesc > limit) {
            out->err_head = head;
            out->err_size = limit;
            return pvq_fail(out, VQP_ERR_CHAIN_LONG, pos, 0);
        }
        uint16_t flags = pvq_flags(vq, pos);
        if (!pvq_available(flags, wrap)) {
            out->err_head = head;
            return pvq_fail(out, VQP_ERR_NOT_AVAIL, pos, 0);
        }
        /* Read once: the flags above, the rest here; the copy's flags are not looked at. */
        struct pvirtq_desc d = pvq_load_desc(vq->desc, pos);
        if (flags & VRING_DESC_F_INDIRECT) {
            if (!vq->indirect)
                return pvq_fail(out, VQ_ERR_INDIRECT_OFF, pos, 0);
            if (ndesc > 1)
                return pvq_fail(out, VQP_ERR_INDIRECT_CHAIN, pos, 0);
            if (flags & VRING_DESC_F_NEXT)
                return pvq_fail(out, VQ_ERR_INDIRECT_NEXT, pos, 0);
            int32_t status = pvq_walk_indirect(vq, mem, pos, &d, writable, segs, cap, &nseg, &total, out);
            if (status != VQ_OK)
                return status;
            id = d.id;
            break;
        }
        if (!pvq_direction_ok(flags, writable))
            return pvq_fail(out, VQ_ERR_DIRECTION, pos, 0);
        if (d.len) {
            uint8_t *host = vm_translate(mem, d.addr, d.len, &out->fault);
            if (!host)
                return pvq_fail(out, VQ_ERR_BUFFER_MEM, pos, 0);
            if (nseg < cap)
                segs[nseg] = (struct vq_seg){host, d.addr, d.len};
            nseg++;
            total += d.len;
        }
        if (!(flags & VRING_DESC_F_NEXT)) {
            id = d.id;
            break;
        }
        pvq_step(vq, &pos, &wrap);
    }
    /* The buffer id is in the chain's last descriptor (spec 2.8.6), the indirect one for a table. */
    *chain = (struct vqp_chain){.len = total,
                                .nseg = nseg <= cap ? nseg : VQ_NOT_STORED,
                                .pos = (uint16_t)head,
                                .id = id,
                                .ndesc = (uint16_t)ndesc,
                                .wrap = start_wrap};
    return VQ_OK;
}

/* PackedVirtqueue.pop: walk the chain at last_avail_idx, check its id (in range, not in flight), take it. */
static inline int32_t pvq_pop(struct vq_packed *vq, const struct vm_memory *mem, int32_t writable,
                              struct vq_seg *segs, uint32_t cap, struct vqp_chain *chain, struct vq_batch *out)
{
    int32_t status = pvq_walk(vq, mem, vq->last_avail_idx, vq->avail_wrap_counter, writable, segs, cap, chain, out);
    if (status != VQ_OK)
        return status;
    uint16_t id = chain->id;
    if (id >= vq->num || vq->inflight[id]) {
        /* err_desc: the chain's last descriptor in the ring. */
        uint32_t last = chain->pos;
        uint8_t w = chain->wrap;
        pvq_skip(vq, &last, &w, chain->ndesc - 1u);
        out->err_head = chain->pos;
        out->err_value = id;
        return pvq_fail(out, id >= vq->num ? VQP_ERR_ID : VQP_ERR_ID_IN_USE, last, 0);
    }
    vq->inflight[id] = chain->ndesc;
    uint32_t next = chain->pos;
    uint8_t wrap = chain->wrap;
    pvq_skip(vq, &next, &wrap, chain->ndesc);
    vq->last_avail_idx = (uint16_t)next;
    vq->avail_wrap_counter = wrap;
    return VQ_OK;
}

/* The chains of the whole groups from `first` (wrap counter `wrap`, a multiple of PVQ_BATCH) on whose four
 * descriptors are each a whole chain (available, neither NEXT nor INDIRECT) of the right direction, up to
 * `max` of them and not across the ring's end: the five bits of each exactly these, the four compared at once.
 * Only the flags are read (relaxed: the caller fences once before it reads the rest of the descriptors). */
static inline uint32_t pvq_group_chains(uint8_t *desc, uint32_t num, uint32_t first, uint8_t wrap, uint32_t max,
                                        int32_t writable)
{
    const uint16_t mask = VRING_PACKED_DESC_F_AVAIL_MASK | VRING_PACKED_DESC_F_USED_MASK | VRING_DESC_F_NEXT |
                          VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE;
    uint32_t n = 0, pos = first;
    while (n + PVQ_BATCH <= max && pos + PVQ_BATCH <= num) {
        const uint16_t want = (uint16_t)((wrap ? VRING_PACKED_DESC_F_AVAIL_MASK : VRING_PACKED_DESC_F_USED_MASK) |
                                         (writable ? VRING_DESC_F_WRITE : 0));
        uint16_t differ = 0;
        for (uint32_t k = 0; k < PVQ_BATCH; k++)
            differ |= (uint16_t)((__atomic_load_n(pvq_word(desc, (size_t)(pos + k) * PVQ_DESC_SIZE +
                                                                      PVQ_FLAGS_OFFSET),
                                                  __ATOMIC_RELAXED) &
                                  mask) ^
                                 want);
        if (differ)
            break;
        n += PVQ_BATCH;
        pvq_skip_in(num, &pos, &wrap, PVQ_BATCH);
    }
    return n;
}

/* The group at `pos` (pvq_group_chains found its flags right) copied into d[] and checked as pvq_pop would
 * check its four chains: lengths other than 0, ids in range, not in flight and not the same twice, buffers in
 * guest memory (vm_translate, each: *region is the last one's), their segments in seg[]. 1 when all hold. */
static inline int pvq_group_ok(const uint8_t *desc, uint32_t pos, uint32_t num, const uint16_t *inflight,
                               const struct vm_memory *mem, const struct vm_region **region,
                               struct pvirtq_desc *d, struct vq_seg *seg)
{
    struct vm_fault fault; /* a group that declines leaves the fault for pvq_pop to report */
    for (uint32_t k = 0; k < PVQ_BATCH; k++)
        d[k] = pvq_load_desc(desc, pos + k);
    for (uint32_t k = 0; k < PVQ_BATCH; k++) {
        if (!d[k].len || d[k].id >= num || inflight[d[k].id])
            return 0;
        for (uint32_t j = 0; j < k; j++)
            if (d[j].id == d[k].id)
                return 0;
        uint8_t *host = vm_translate_next(mem, region, d[k].addr, d[k].len, &fault);
        if (!host)
            return 0;
        seg[k] = (struct vq_seg){host, d[k].addr, d[k].len};
    }
    return 1;
}

#define PVQ_BATCH_MAX 32

/* The chains of the whole groups a batch may take from last_avail_idx, up to `max` (at most PVQ_BATCH_MAX):
 * every group's flags read first, each once (pvq_group_chains), then an acquire fence (what the driver wrote
 * before a flag is visible after it), as pvq_walk reads a chain, so that the caller reads the rest of the
 * descriptors after it and only then writes a byte: the misses on the driver's lines overlap (as
 * vq_peek_batch's). 0 when last_avail_idx is not a multiple of PVQ_BATCH. */
static inline uint32_t pvq_run_chains(const struct vq_packed *vq, uint32_t max, int32_t writable)
{
    const uint32_t first = vq->last_avail_idx;
    if (first % PVQ_BATCH)
        return 0;
    uint32_t n = pvq_group_chains(vq->desc, vq->num, first, vq->avail_wrap_counter,
                                  max < PVQ_BATCH_MAX ? max : PVQ_BATCH_MAX, writable);
    if (!n)
        return 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    /* The next group's line asked for now, the driver's core's, while these are checked and used. */
    uint32_t pos = first;
    uint8_t wrap = vq->avail_wrap_counter;
    pvq_skip_in(vq->num, &pos, &wrap, n);
    if (pos + PVQ_BATCH <= vq->num)
        __builtin_prefetch(vq->desc + (size_t)pos * PVQ_DESC_SIZE);
    return n;
}

/* Up to `max` chains, PVQ_BATCH at a time, each group as the PVQ_BATCH pvq_pops would take them one after the
 * other (the same chains, segments, ids in flight and position), as long as the group is one pvq_run_chains
 * counts and pvq_group_ok takes. Returns how many; the first group that is not so and those after it are not
 * touched, not even *out, and pvq_pop takes the next chain with every check and fault of its own. A batch is
 * thus only ever what pvq_pop would have done without a fault: the checks are the same ones, all made before
 * a group is taken. */
static inline uint32_t pvq_pop_batch(struct vq_packed *vq, const struct vm_memory *mem, int32_t writable,
                                     struct vq_seg *segs, struct vqp_chain *chains, uint32_t max)
{
    const uint32_t n = pvq_run_chains(vq, max, writable);
    /* The queue's fields in locals: stores through pointers (segs, chains) could alias them, and the compiler
     * would read them again for every chain. */
    uint16_t *const inflight = vq->inflight;
    const uint32_t num = vq->num;
    const struct vm_region *region = NULL;
    uint32_t taken = 0, pos = vq->last_avail_idx;
    uint8_t wrap = vq->avail_wrap_counter;
    while (taken < n) {
        struct pvirtq_desc d[PVQ_BATCH];
        if (!pvq_group_ok(vq->desc, pos, num, inflight, mem, &region, d, segs + taken))
            break;
        for (uint32_t k = 0; k < PVQ_BATCH; k++) {
            inflight[d[k].id] = 1;
            chains[taken + k] = (struct vqp_chain){
                .len = d[k].len, .nseg = 1, .pos = (uint16_t)(pos + k), .id = d[k].id, .ndesc = 1, .wrap = wrap};
        }
        taken += PVQ_BATCH;
        pvq_skip_in(num, &pos, &wrap, PVQ_BATCH);
    }
    vq->last_avail_idx = (uint16_t)pos;
    vq->avail_wrap_counter = wrap;
    return taken;
}

/* Give back chains[0..n), taken one after the other and not used (pvq_pop_batch's, past those a batch
 * used): their ids free, the position at the first. */
static inline void pvq_unpop_rest(struct vq_packed *vq, const struct vqp_chain *chains, uint32_t n)
{
    if (!n)
        return;
    for (uint32_t k = 0; k < n; k++)
        vq->inflight[chains[k].id] = 0;
    vq->last_avail_idx = chains[0].pos;
    vq->avail_wrap_counter = chains[0].wrap;
}

static inline void pvq_unpop(struct vq_packed *vq, const struct vqp_chain *chain)
{
    if (chain->id < vq->num && vq->inflight)
        vq->inflight[chain->id] = 0;
    vq->last_avail_idx = chain->pos;
    vq->avail_wrap_counter = chain->wrap;
}

/* packed.packed_need_event, modulo 2 * num. */
static inline int pvq_need_event(uint32_t num, int64_t event, int64_t new_pos, int64_t old_pos)
{
    int64_t lap = 2 * (int64_t)num;
    int64_t passed = ((new_pos - event - 1) % lap + lap) % lap;
    int64_t moved = ((new_pos - old_pos) % lap + lap) % lap;
    return passed < moved;
}

/* Store `value` at `offset` of a device-written area unless it holds it already: the same value written
 * again by every batch (a polling device's DISABLE, the same off_wrap while nothing came) took the line away
 * from the driver, which reads it after every burst it makes available, for nothing. What the area holds is
 * what a store would have left: the driver, had it written there, finds its word put right as before. */
static inline int pvq_set_word(uint8_t *area, size_t offset, uint16_t value, int release)
{
    uint16_t *word = pvq_word(area, offset);
    if (__atomic_load_n(word, __ATOMIC_RELAXED) == value)
        return 0;
    if (release)
        __atomic_store_n(word, value, __ATOMIC_RELEASE);
    else
        __atomic_store_n(word, value, __ATOMIC_RELAXED);
    return 1;
}

/* The used descriptor a write puts at *pos, its flags held back (the caller writes them in the spec's order). */
static inline void pvq_write_used(struct vq_packed *vq, uint32_t pos, uint16_t id, uint32_t len)
{
    uint8_t *d = vq->desc + (size_t)pos * PVQ_DESC_SIZE;
    memcpy(d + PVQ_LEN_OFFSET, &len, sizeof len);
    memcpy(d + PVQ_ID_OFFSET, &id, sizeof id);
}

static inline void pvq_complete(struct vq_packed *vq, const struct vm_memory *mem,
                                const struct vqp_used_elem *pending, uint32_t n, struct vq_batch *out)
{
    out->used = n;
    if (!vq->desc || !vq->driver || !vq->device || !vq->num || vq->num > 32768 || vq->used_idx >= vq->num) {
        out->status = VQ_ERR_ARGUMENT;
        return;
    }
    if (n) {
        /* With in_order, a batch of length-0 entries is one used descriptor: the last id at the first's place,
         * moving the used position past every chain of the batch (spec 2.8.8). A dequeue's entries all are;
         * an enqueue's first is not, which settles it at once. The scan has no exit inside: a chain of
         * dependent branches over a whole batch cost a dequeue a tenth of its time. */
        int one = vq->in_order && !pending[0].len;
        uint32_t skipped = 0;
        if (one) {
            uint32_t lens = 0;
            for (uint32_t k = 0; k < n; k++) {
                lens |= pending[k].len;
                skipped += pending[k].ndesc;
            }
            one = !lens;
        }
        uint32_t writes = one ? 1 : n;
        const uint32_t first = vq->used_idx;
        const uint8_t first_wrap = vq->used_wrap_counter;
        uint32_t pos = first;
        uint8_t wrap = first_wrap;
        if (one) {
            pvq_write_used(vq, pos, pending[n - 1].id, 0);
            pvq_skip(vq, &pos, &wrap, skipped);
        } else {
            /* Each descriptor's id and length, then its flags with a release store (what the driver finds
             * once the flags say used is there: the barrier DPDK and the reference put between all ids and
             * all flags, per descriptor, in one pass over the lines instead of two)... The ring and its size
             * in locals: stores into the ring could alias anything, the compiler would read them again. */
            uint8_t *desc = vq->desc;
            const uint32_t num = vq->num;
            for (uint32_t w = 0; w < n; w++) {
                const struct vqp_used_elem e = pending[w];
                uint8_t *d = desc + (size_t)pos * PVQ_DESC_SIZE;
                memcpy(d + PVQ_LEN_OFFSET, &e.len, sizeof e.len);
                memcpy(d + PVQ_ID_OFFSET, &e.id, sizeof e.id);
                if (w)
                    __atomic_store_n(pvq_word(d, PVQ_FLAGS_OFFSET), pvq_used_flags(wrap, e.len > 0),
                                     __ATOMIC_RELEASE);
                pvq_skip_in(num, &pos, &wrap, e.ndesc);
            }
        }
        /* ...but the first's, written last: the driver polls only the next position, and finds the whole batch
         * (a mergeable frame's buffers among it) once that one turns used (spec 2.8.9). */
        __atomic_store_n(pvq_word(vq->desc, (size_t)first * PVQ_DESC_SIZE + PVQ_FLAGS_OFFSET),
                         pvq_used_flags(first_wrap, !one && pending[0].len > 0), __ATOMIC_RELEASE);
        if (vq->log_dirty && vq->log_rings) {
            uint32_t p = first;
            uint8_t wr = first_wrap;
            for (uint32_t w = 0; w < writes; w++) {
                vq_log_write(mem, vq->desc_log_addr + (uint64_t)p * PVQ_DESC_SIZE, PVQ_DESC_SIZE, out);
                pvq_skip(vq, &p, &wr, one ? skipped : pending[w].ndesc);
            }
        }
        uint16_t *inflight = vq->inflight;
        if (inflight)
            for (uint32_t k = 0, num = vq->num; k < n; k++)
                if (pending[k].id < num)
                    inflight[pending[k].id] = 0;
        vq->used_idx = (uint16_t)pos;
        vq->used_wrap_counter = wrap;
    }

    /* Whether the driver wants an interrupt (spec 2.8.10): the used flags must be visible before we read what
     * it asked for, the other half of the barrier the driver has between enabling interrupts and polling. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int64_t num = vq->num;
    int64_t new_pos = vq->used_idx + num * vq->used_wrap_counter;
    int64_t old_pos = vq->signalled_used + num * vq->signalled_used_wrap;
    uint16_t flags = __atomic_load_n(pvq_word(vq->driver, PVQ_EVENT_FLAGS_OFFSET), __ATOMIC_RELAXED) & 3;
    if (flags == RING_EVENT_FLAGS_DISABLE) {
        out->notify = 0;
    } else if (flags == RING_EVENT_FLAGS_DESC && vq->event_idx) {
        uint16_t off_wrap = __atomic_load_n(pvq_word(vq->driver, 0), __ATOMIC_RELAXED);
        int64_t event = (off_wrap & 0x7FFF) + num * (off_wrap >> PVQ_WRAP_SHIFT);
        out->notify = (uint8_t)pvq_need_event(vq->num, event, new_pos, old_pos);
    } else {
        out->notify = new_pos != old_pos;
    }
    vq->signalled_used = vq->used_idx;
    vq->signalled_used_wrap = vq->used_wrap_counter;

    /* Ask for a notification at the next available descriptor, or (a polling device) for none. off_wrap goes
     * before the flags that make it count. */
    int asked;
    if (!vq->kicks) {
        asked = pvq_set_word(vq->device, PVQ_EVENT_FLAGS_OFFSET, RING_EVENT_FLAGS_DISABLE, 0);
    } else if (vq->event_idx) {
        uint16_t off_wrap = (uint16_t)(vq->last_avail_idx | vq->avail_wrap_counter << PVQ_WRAP_SHIFT);
        asked = pvq_set_word(vq->device, 0, off_wrap, 0);
        asked |= pvq_set_word(vq->device, PVQ_EVENT_FLAGS_OFFSET, RING_EVENT_FLAGS_DESC, 1);
    } else {
        asked = pvq_set_word(vq->device, PVQ_EVENT_FLAGS_OFFSET, RING_EVENT_FLAGS_ENABLE, 0);
    }
    /* Logged even when nothing was used: a migration's destination must see what the driver was asked. */
    if (vq->log_dirty && vq->log_rings)
        vq_log_write(mem, vq->device_log_addr, PVQ_EVENT_SIZE, out);
    /* What was asked for, visible before the next look at the ring (as vq_complete); nothing stored, nothing
     * to order. */
    if (asked)
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

#endif
