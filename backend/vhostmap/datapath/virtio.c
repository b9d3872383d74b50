/* Split virtqueue batch kernels: frames between a virtio-net device's virtqueues and netmap slots (virtio 1.x
 * spec 2.7 and 5.1.6).
 *
 * The compiled twins of rxtx.dequeue / rxtx.enqueue in vhostmap/vhost_user/, with SplitVirtqueue's descriptor
 * walk (pop/_walk), the completion a port runs after each batch (flush_used, call, enable_kicks) and
 * GuestMemory._locate_gpa. Those Python versions are the reference: tests/unit/test_kernels_differential.py
 * drives both over the same rings and compares every byte, index, count and error.
 *
 * Everything in guest memory belongs to an untrusted driver that may change it while we look: each value is
 * read once (a 16-bit index with one load, a descriptor copied out), checked, then used from the copy, and
 * every guest-physical address goes through vm_translate. Each phase finishes before the next starts, as in
 * the reference: a chain is walked and validated completely before a byte of it is copied, and the receive
 * chains of a frame are all reserved before any is written, so a fault or a shortage leaves nothing half
 * done.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "packed_ring.h"
#include "refs.h"
#include "virtio_shared.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x rings are little-endian and read natively here"
#endif

/* Split ring layout (spec 2.7; VRING_* in vhostmap/virtio/spec.py):
 *   descriptor table  {u64 addr, u32 len, u16 flags, u16 next}[num]
 *   available ring    u16 flags, u16 idx, u16 ring[num], u16 used_event
 *   used ring         u16 flags, u16 idx, {u32 id, u32 len}[num], u16 avail_event */
struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
#define VRING_DESC_SIZE 16
#define VRING_RING_HEADER 4
#define VRING_USED_ELEM_SIZE 8

/* A walked chain: its head, total length, how many segments were stored (VQ_NOT_STORED: more than fit) and
 * the available entry it was taken from. */
struct vq_chain {
    uint64_t len;
    uint32_t nseg;
    uint16_t head;
    uint16_t at;
};
#define VQ_NOT_STORED UINT32_MAX

/* --- guest memory --------------------------------------------------------------------------------------- */

static uint8_t *vm_fault_at(struct vm_fault *fault, int32_t reason, uint64_t gpa, uint64_t len,
                            const struct vm_region *r)
{
    fault->reason = reason;
    fault->addr = gpa;
    fault->len = len;
    fault->region_gpa = r ? r->gpa : 0;
    fault->region_size = r ? r->size : 0;
    return NULL;
}

static inline uint8_t *vm_translate_in(const struct vm_memory *mem, uint64_t gpa, uint64_t len,
                                       struct vm_fault *fault, const struct vm_region **region)
{
    /* The range may end at 2^64 exactly, not beyond (memory.py: ADDRESS_LIMIT). */
    if (gpa != 0 && len > UINT64_MAX - gpa + 1)
        return vm_fault_at(fault, VM_FAULT_ADDRESS_SPACE, gpa, len, NULL);
    if (mem->nregions == 0)
        return vm_fault_at(fault, VM_FAULT_NO_REGIONS, gpa, len, NULL);
    /* bisect_right over the region starts: lo is the number of regions starting at or below gpa. */
    uint32_t lo = 0, hi = mem->nregions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (mem->regions[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return vm_fault_at(fault, VM_FAULT_NO_REGION, gpa, len, NULL);
    const struct vm_region *r = &mem->regions[lo - 1];
    uint64_t offset = gpa - r->gpa;
    if (offset >= r->size)
        return vm_fault_at(fault, VM_FAULT_NO_REGION, gpa, len, NULL);
    if (len > r->size - offset)
        return vm_fault_at(fault, VM_FAULT_CROSSES_END, gpa, len, r);
    *region = r;
    return (uint8_t *)(uintptr_t)(r->host + offset);
}

uint8_t *vm_translate(const struct vm_memory *mem, uint64_t gpa, uint64_t len, struct vm_fault *fault)
{
    const struct vm_region *r;
    return vm_translate_in(mem, gpa, len, fault, &r);
}

uint8_t *vm_translate_region(const struct vm_memory *mem, uint64_t gpa, uint64_t len, struct vm_fault *fault,
                             const struct vm_region **region)
{
    return vm_translate_in(mem, gpa, len, fault, region);
}

/* GuestMemory.log_write: mark [gpa, gpa + len) dirty; remember the first range that missed the log (shared
 * with packed.c through virtio_shared.h). */
void vq_log_write(const struct vm_memory *mem, uint64_t gpa, uint64_t len, struct vq_batch *out)
{
    uint64_t missed = mem->log ? vm_log_dirty(mem->log, mem->log_size, gpa, len) : (len != 0);
    if (missed && !out->log_missed) {
        out->log_missed_addr = gpa;
        out->log_missed_len = len;
    }
    out->log_missed += missed;
}

/* --- ring access: one load or store per shared value ---------------------------------------------------- */

static inline uint16_t *ring16(uint8_t *ring, uint32_t offset)
{
    return (uint16_t *)(void *)(ring + offset);
}

static inline uint16_t load16(uint8_t *ring, uint32_t offset)
{
    return __atomic_load_n(ring16(ring, offset), __ATOMIC_RELAXED);
}

static inline void store16(uint8_t *ring, uint32_t offset, uint16_t value)
{
    __atomic_store_n(ring16(ring, offset), value, __ATOMIC_RELAXED);
}

/* avail->idx; what the driver wrote before it (ring entries, descriptors, buffers) is visible after it. */
static inline uint16_t vq_avail_idx(const struct vq_split *vq)
{
    return __atomic_load_n(ring16(vq->avail, 2), __ATOMIC_ACQUIRE);
}

static inline uint32_t vq_used_event_offset(const struct vq_split *vq)
{
    return VRING_RING_HEADER + 2 * vq->num;
}

static inline uint32_t vq_avail_event_offset(const struct vq_split *vq)
{
    return VRING_RING_HEADER + VRING_USED_ELEM_SIZE * vq->num;
}

/* A copy of descriptor `i` of `table`: every check and every use below looks at this copy, never again at the
 * guest's (the compiler barrier keeps it from re-reading guest memory for a field). Indirect tables need not
 * be aligned, hence memcpy. */
static inline struct vring_desc vq_load_desc(const uint8_t *table, uint32_t i)
{
    struct vring_desc d;
    memcpy(&d, table + (size_t)i * VRING_DESC_SIZE, sizeof d);
    __asm__ __volatile__("" ::: "memory");
    return d;
}

static inline struct nm_slot *nm_slot_at(const struct nm_bufs *nm, uint32_t i)
{
    return &nm->slots[i];
}

/* --- faults --------------------------------------------------------------------------------------------- */

static int32_t vq_fail(struct vq_batch *out, int32_t status, uint32_t desc)
{
    out->status = status;
    out->err_desc = desc;
    return status;
}

static int32_t vq_fail_chain(struct vq_batch *out, int32_t status, uint16_t head, uint64_t value)
{
    out->status = status;
    out->err_head = head;
    out->err_value = value;
    return status;
}

static int vq_args_ok(const struct vq_split *vq, const struct nm_bufs *nm, uint32_t first, uint32_t count)
{
    return vq->desc && vq->avail && vq->used && vq->num && vq->num <= 32768 && !(vq->num & (vq->num - 1)) &&
           nm->slots && nm->base && nm->num_slots && nm->buf_size && nm->nbufs && first < nm->num_slots &&
           count <= nm->num_slots;
}

static void vq_batch_init(struct vq_batch *out)
{
    memset(out, 0, sizeof *out);
    out->bad_slot = -1;
}

/* --- the descriptor walk (SplitVirtqueue._walk) --------------------------------------------------------- */

/* Walk and validate the chain at `head`, every check of the reference in its order; store up to `cap` of its
 * segments in `segs`. Returns VQ_OK or the fault (in `out`). */
static int32_t vq_walk(const struct vq_split *vq, const struct vm_memory *mem, uint16_t head, int writable,
                       struct vq_seg *segs, uint32_t cap, struct vq_chain *chain, struct vq_batch *out)
{
    const uint8_t *table = vq->desc;
    uint32_t size = vq->num, i = head, nseg = 0;
    int in_indirect = 0;
    uint64_t total = 0;

    for (uint32_t step = 0; step < VQ_MAX_CHAIN_LENGTH; step++) {
        struct vring_desc d = vq_load_desc(table, i);
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (!vq->indirect)
                return vq_fail(out, VQ_ERR_INDIRECT_OFF, i);
            if (in_indirect)
                return vq_fail(out, VQ_ERR_NESTED_INDIRECT, i);
            if (d.flags & VRING_DESC_F_NEXT)
                return vq_fail(out, VQ_ERR_INDIRECT_NEXT, i);
            if (d.len == 0 || d.len % VRING_DESC_SIZE || d.len / VRING_DESC_SIZE > VQ_MAX_CHAIN_LENGTH) {
                out->err_value = d.len;
                return vq_fail(out, VQ_ERR_INDIRECT_LEN, i);
            }
            table = vm_translate(mem, d.addr, d.len, &out->fault);
            if (!table)
                return vq_fail(out, VQ_ERR_INDIRECT_MEM, i);
            size = d.len / VRING_DESC_SIZE;
            i = 0;
            in_indirect = 1;
            continue;
        }
        if (!!(d.flags & VRING_DESC_F_WRITE) != writable)
            return vq_fail(out, VQ_ERR_DIRECTION, i);
        if (d.len) {
            uint8_t *host = vm_translate(mem, d.addr, d.len, &out->fault);
            if (!host)
                return vq_fail(out, VQ_ERR_BUFFER_MEM, i);
            if (nseg < cap)
                segs[nseg] = (struct vq_seg){host, d.addr, d.len};
            nseg++;
            total += d.len;
        }
        if (!(d.flags & VRING_DESC_F_NEXT)) {
            chain->len = total;
            chain->nseg = nseg <= cap ? nseg : VQ_NOT_STORED;
            chain->head = head;
            return VQ_OK;
        }
        if (d.next >= size) {
            out->err_value = d.next;
            out->err_size = size;
            return vq_fail(out, VQ_ERR_NEXT, i);
        }
        i = d.next;
    }
    out->err_head = head;
    return vq_fail(out, VQ_ERR_LOOP, i);
}

/* SplitVirtqueue.pop: validate the chain at available entry last_avail_idx and consume it. */
static int32_t vq_pop(struct vq_split *vq, const struct vm_memory *mem, int writable, struct vq_seg *segs,
                      uint32_t cap, struct vq_chain *chain, struct vq_batch *out)
{
    uint32_t slot = vq->last_avail_idx & (vq->num - 1);
    uint16_t head = load16(vq->avail, VRING_RING_HEADER + 2 * slot);
    if (head >= vq->num) {
        out->err_slot = slot;
        return vq_fail(out, VQ_ERR_HEAD, head);
    }
    int32_t status = vq_walk(vq, mem, head, writable, segs, cap, chain, out);
    if (status == VQ_OK)
        chain->at = vq->last_avail_idx++;
    return status;
}

/* Up to `max` (at most VQ_BATCH) chains from available entry last_avail_idx on that vq_pop would take as the
 * plain case: a head in the table, one descriptor (neither NEXT nor INDIRECT) of the right direction, not
 * empty, in guest memory. Nothing is taken: their heads and segments in heads[] and segs[], and how many in a
 * row are so (the first that is not and those after it are vq_pop's, with every check and fault of its own).
 * The caller knows the driver made `max` available (its count of avail->idx). All the heads are read first,
 * then all the descriptors, and only then does the caller write a byte: the misses on lines the driver's
 * core wrote overlap instead of coming one chain after the other, each behind the stores of the frame
 * before (DPDK's enqueue defers its small copies to the end of a burst for the same reason). */
#define VQ_BATCH 32
static inline uint32_t vq_peek_batch(const struct vq_split *vq, const struct vm_memory *mem, int32_t writable,
                                     uint32_t max, uint16_t *heads, struct vq_seg *segs)
{
    /* The queue's fields in locals: stores through segs could alias them. */
    const uint8_t *const table = vq->desc;
    const uint32_t mask = vq->num - 1;
    const uint16_t at = vq->last_avail_idx;
    uint32_t n = max < VQ_BATCH ? max : VQ_BATCH;
    for (uint32_t k = 0; k < n; k++)
        heads[k] = load16(vq->avail, VRING_RING_HEADER + 2 * ((at + k) & mask));
    struct vring_desc d[VQ_BATCH];
    for (uint32_t k = 0; k < n; k++) {
        if (heads[k] > mask) {
            n = k;
            break;
        }
        d[k] = vq_load_desc(table, heads[k]);
    }
    const uint16_t kind = VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE;
    const uint16_t want = writable ? VRING_DESC_F_WRITE : 0;
    struct vm_fault fault; /* a chain the batch leaves gets its fault from vq_pop */
    const struct vm_region *region = NULL;
    for (uint32_t k = 0; k < n; k++) {
        if ((d[k].flags & kind) != want || !d[k].len)
            return k;
        uint8_t *host = vm_translate_next(mem, &region, d[k].addr, d[k].len, &fault);
        if (!host)
            return k;
        segs[k] = (struct vq_seg){host, d[k].addr, d[k].len};
    }
    return n;
}

/* The chains vq_peek_batch finds, taken as vq_pop would take them. Returns how many. */
static inline uint32_t vq_pop_batch(struct vq_split *vq, const struct vm_memory *mem, int32_t writable,
                                    struct vq_seg *segs, struct vq_chain *chains, uint32_t max)
{
    uint16_t heads[VQ_BATCH];
    const uint16_t at = vq->last_avail_idx;
    uint32_t n = vq_peek_batch(vq, mem, writable, max, heads, segs);
    for (uint32_t k = 0; k < n; k++)
        chains[k] = (struct vq_chain){.len = segs[k].len, .nseg = 1, .head = heads[k], .at = (uint16_t)(at + k)};
    vq->last_avail_idx = (uint16_t)(at + n);
    return n;
}

/* Give back chains[0..n), taken one after the other and not used (the last taken): the position at the
 * first. */
static inline void vq_unpop_rest(struct vq_split *vq, const struct vq_chain *chains, uint32_t n)
{
    if (n)
        vq->last_avail_idx = chains[0].at;
}

uint32_t vq_pending(const struct vq_split *vq)
{
    if (!vq->avail || !vq->num)
        return 0;
    uint16_t n = (uint16_t)(vq_avail_idx(vq) - vq->last_avail_idx);
    return n <= vq->num ? n : 0;
}

/* --- completion: flush_used, call, enable_kicks --------------------------------------------------------- */

static void vq_complete(struct vq_split *vq, const struct vm_memory *mem, const struct vq_used_elem *pending,
                        uint32_t n, struct vq_batch *out)
{
    if (n) {
        /* Entries first, then used->idx with a release store: the driver reads idx, then the entries. */
        uint16_t idx = vq->used_idx;
        for (uint32_t k = 0; k < n; k++, idx++)
            memcpy(vq->used + VRING_RING_HEADER + VRING_USED_ELEM_SIZE * (idx & (vq->num - 1)), &pending[k],
                   VRING_USED_ELEM_SIZE);
        __atomic_store_n(ring16(vq->used, 2), idx, __ATOMIC_RELEASE);
        vq->used_idx = idx;
        if (vq->log_dirty && vq->log_used)
            vq_log_write(mem, vq->log_used_addr, vq_avail_event_offset(vq) + 2, out);
    }
    out->used = n;

    /* Whether the driver wants an interrupt (spec 2.7.10): used->idx must be visible before we read what it
     * asked for: the other half of the barrier the driver has between re-enabling interrupts and reading
     * idx. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t new_idx = vq->used_idx, old_idx = vq->signalled_used;
    if (vq->event_idx) {
        uint16_t used_event = load16(vq->avail, vq_used_event_offset(vq));
        out->notify = (uint16_t)(new_idx - used_event - 1) < (uint16_t)(new_idx - old_idx);
    } else {
        out->notify = new_idx != old_idx && !(load16(vq->avail, 0) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    vq->signalled_used = new_idx;

    /* Ask for a kick at the next available entry; visible before the next look at avail->idx. A polling
     * device asks for none, as DPDK's does: a kick costs the driver a system call per burst. With EVENT_IDX
     * (where the flag means nothing) it just stops moving avail_event, which the driver passes once per 2^16
     * entries. */
    uint32_t written = UINT32_MAX; /* offset in the used ring of the u16 written, if any */
    int stored = 0;
    if (vq->kicks) {
        written = vq->event_idx ? vq_avail_event_offset(vq) : 0;
        store16(vq->used, written, vq->event_idx ? vq->last_avail_idx : 0);
        stored = 1;
    } else if (!vq->event_idx) {
        written = 0;
        /* Once is enough: only the device writes the flags. */
        if (load16(vq->used, 0) != VRING_USED_F_NO_NOTIFY) {
            store16(vq->used, 0, VRING_USED_F_NO_NOTIFY);
            stored = 1;
        }
    }
    /* Logged even when no used entry was published (a batch that took nothing): the destination of a
     * migration must see the avail_event it was asked for, or its device waits for a kick that never comes. */
    if (written != UINT32_MAX && vq->log_dirty && vq->log_used)
        vq_log_write(mem, vq->log_used_addr + written, 2, out);
    /* What was asked for, visible before the next look at avail->idx. Nothing stored, nothing to order: a
     * full fence waits for every store before it (the guest's lines this batch wrote among them). */
    if (stored)
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* --- dequeue: guest transmit queue -> netmap slots ------------------------------------------------------ */

static void nm_close_slot(struct nm_slot *slot, uint32_t len, uint16_t flags)
{
    slot->len = (uint16_t)len;
    slot->flags = flags;
}

/* The first of segs[0..nseg) with bytes left once the first `skip` bytes (the virtio-net header) are passed
 * over, and in *offset where they start in it; nseg when none is. */
static uint32_t vq_seg_skip(const struct vq_seg *segs, uint32_t nseg, uint64_t skip, uint32_t *offset)
{
    uint32_t k = 0;
    while (k < nseg && skip >= segs[k].len)
        skip -= segs[k++].len;
    *offset = (uint32_t)skip;
    return k;
}

/* rxtx._gather: copy the segments minus their first `skip` bytes into consecutive slots from `pos`. */
static void vq_gather(const struct nm_bufs *nm, const struct vq_seg *segs, uint32_t nseg, uint64_t skip,
                      uint32_t pos)
{
    struct nm_slot *slot = nm_slot_at(nm, pos);
    uint8_t *dst = nm_slot_buf(nm, slot);
    uint32_t filled = 0;

    uint32_t off;
    for (uint32_t k = vq_seg_skip(segs, nseg, skip, &off); k < nseg; k++, off = 0) {
        const uint8_t *src = segs[k].host + off;
        uint32_t left = segs[k].len - off;
        while (left) {
            if (filled == nm->buf_size) {
                nm_close_slot(slot, filled, NS_MOREFRAG);
                if (++pos == nm->num_slots)
                    pos = 0;
                slot = nm_slot_at(nm, pos);
                dst = nm_slot_buf(nm, slot);
                filled = 0;
            }
            uint32_t n = nm->buf_size - filled < left ? nm->buf_size - filled : left;
            memcpy(dst + filled, src, n);
            filled += n;
            src += n;
            left -= n;
        }
    }
    nm_close_slot(slot, filled, 0);
}

/* The slots a frame takes when they refer to its segments minus the first `skip` bytes (one per piece of at
 * most buf_size bytes), or 0 when it is to be copied instead: more slots than `space` or than `refs` has left
 * (a chain of many small segments), or a first piece shorter than `min_head`. */
static uint32_t vq_ref_slots(const struct nm_bufs *nm, const struct vq_refs *refs, const struct vq_seg *segs,
                             uint32_t nseg, uint64_t skip, uint32_t min_head, uint32_t space)
{
    uint32_t limit = refs->cap - refs->count, n = 0;
    if (space < limit)
        limit = space;
    uint32_t off;
    for (uint32_t k = vq_seg_skip(segs, nseg, skip, &off); k < nseg; k++, off = 0) {
        uint32_t len = segs[k].len - off;
        if (!len)
            continue;
        if (n == 0 && len < min_head)
            return 0;
        n += (len + nm->buf_size - 1) / nm->buf_size;
        if (n > limit)
            return 0;
    }
    return n;
}

/* vq_ref_slots > 0: fill the slots from `pos` with tickets for the segments minus the first `skip` bytes.
 * Inlined into both ring layouts' dequeue (it was into the split one's alone, before the packed one used it). */
__attribute__((always_inline)) static inline void vq_refer(const struct nm_bufs *nm, struct vq_refs *refs,
                                                           const struct vq_seg *segs, uint32_t nseg,
                                                           uint64_t skip, uint32_t pos)
{
    struct nm_slot *slot = NULL;
    uint32_t filled = 0;
    uint32_t off;
    for (uint32_t k = vq_seg_skip(segs, nseg, skip, &off); k < nseg; k++, off = 0) {
        const uint8_t *src = segs[k].host + off;
        uint32_t left = segs[k].len - off;
        while (left) {
            if (slot) {
                nm_close_slot(slot, filled, NS_INDIRECT | NS_MOREFRAG);
                if (++pos == nm->num_slots)
                    pos = 0;
            }
            filled = left < nm->buf_size ? left : nm->buf_size;
            uint32_t index = refs->count++;
            refs->refs[index] = (struct vq_ref){src, filled};
            slot = nm_slot_at(nm, pos);
            slot->ptr = vq_ref_ticket(refs, index);
            src += filled;
            left -= filled;
        }
    }
    nm_close_slot(slot, filled, NS_INDIRECT);
}

/* --- offloads the driver left to the device ------------------------------------------------------------- */

/* Copy up to `n` bytes of the segments, from byte `skip` on, to `dst`; the bytes copied. */
static uint32_t vq_seg_read(const struct vq_seg *segs, uint32_t nseg, uint64_t skip, uint8_t *dst, uint32_t n)
{
    uint32_t done = 0, off;
    for (uint32_t k = vq_seg_skip(segs, nseg, skip, &off); k < nseg && done < n; k++, off = 0) {
        uint32_t take = segs[k].len - off < n - done ? segs[k].len - off : n - done;
        memcpy(dst + done, segs[k].host + off, take);
        done += take;
    }
    return done;
}

/* The offload fields of a virtio-net header (its first 10 bytes, little-endian as virtio 1.0 has them). */
static inline struct nm_vnet_hdr vq_vnet_hdr(const uint8_t *raw)
{
    return (struct nm_vnet_hdr){raw[0], raw[1], (uint16_t)(raw[2] | raw[3] << 8), (uint16_t)(raw[4] | raw[5] << 8),
                                (uint16_t)(raw[6] | raw[7] << 8), (uint16_t)(raw[8] | raw[9] << 8)};
}

/* The offload fields of the chain's virtio-net header (its first 10 bytes, over as many descriptors as they
 * span: CVE-2022-2132 was a header split over descriptors read as if it were not); 1 when they ask for
 * work. */
/* Inlined into both dequeue instances, as it was into the one before there were two (it runs for every frame
 * of a queue with host offloads). */
__attribute__((always_inline)) static inline int vq_offload_header(const struct vq_seg *segs, uint32_t nseg,
                                                                   struct nm_vnet_hdr *h)
{
    /* Most frames ask for nothing: flags and gso_type, the first two bytes, say so without a copy. */
    if (nseg && segs[0].len >= 2 && !segs[0].host[0] && !segs[0].host[1])
        return 0;
    uint8_t raw[10];
    if (vq_seg_read(segs, nseg, 0, raw, sizeof raw) != sizeof raw)
        return 0;
    *h = vq_vnet_hdr(raw);
    return (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || h->gso_type != VIRTIO_NET_HDR_GSO_NONE;
}

/* Whether a frame of `length` bytes after the `skip` bytes of its header `h` may travel with the header as
 * it is (nm_offload_check over its first bytes). */
__attribute__((cold)) static int vq_offload_passes(const struct vq_seg *segs, uint32_t nseg, uint64_t skip,
                                                   uint32_t length, const struct nm_vnet_hdr *h)
{
    uint8_t head[NM_OFF_HEAD_MAX];
    uint32_t have = vq_seg_read(segs, nseg, skip, head, length < sizeof head ? length : sizeof head);
    return nm_offload_check(h, head, have, length) == NM_OFF_OK;
}

/* Where a datapath thread completes offloaded frames: the frame, its segments and their lengths (made on
 * first use, kept for the thread's life). */
#define VQ_OFFLOAD_OUT (256u << 10)
#define VQ_OFFLOAD_SEGS 4096
struct vq_offload_scratch {
    uint8_t frame[VQ_MAX_FRAME];
    uint8_t out[VQ_OFFLOAD_OUT];
    uint32_t lens[VQ_OFFLOAD_SEGS];
};
static __thread struct vq_offload_scratch *vq_offload_scratch;

/* The thread's scratch, made on first use; NULL when there is no memory for it. */
static struct vq_offload_scratch *vq_scratch(void)
{
    if (!vq_offload_scratch)
        vq_offload_scratch = malloc(sizeof *vq_offload_scratch);
    return vq_offload_scratch;
}

/* What vq_dequeue_offloaded did with a frame. */
enum { VQ_OFFLOAD_DONE, VQ_OFFLOAD_DROPPED, VQ_OFFLOAD_LATER };

/* Complete the offloads header `h` asks of the frame (the segments minus their first `skip` bytes, `length`
 * bytes) and put what comes out into the slots from `pos`: DONE (*used slots filled, counted in `out`),
 * DROPPED (a header the frame does not bear out, or more segments than the ring holds), or LATER (more slots
 * than `space`). */
__attribute__((cold)) static int vq_dequeue_offloaded(const struct nm_bufs *nm, const struct vq_seg *segs,
                                                     uint32_t nseg, uint64_t skip, uint32_t length,
                                                     const struct nm_vnet_hdr *h, uint32_t pos, uint32_t space,
                                                     uint32_t *used, struct vq_batch *out)
{
    struct vq_offload_scratch *s = vq_scratch();
    if (!s)
        return VQ_OFFLOAD_DROPPED;
    uint32_t got = vq_seg_read(segs, nseg, skip, s->frame, length), n;
    if (nm_offload_complete(h, s->frame, got, s->out, VQ_OFFLOAD_OUT, s->lens, VQ_OFFLOAD_SEGS, &n) != NM_OFF_OK)
        return VQ_OFFLOAD_DROPPED;
    uint32_t need = 0;
    for (uint32_t k = 0; k < n; k++)
        need += (s->lens[k] + nm->buf_size - 1) / nm->buf_size;
    if (need > space)
        return need >= nm->num_slots ? VQ_OFFLOAD_DROPPED : VQ_OFFLOAD_LATER;
    const uint8_t *seg = s->out;
    for (uint32_t k = 0; k < n; k++) {
        /* A segment is one piece of memory: the gather of a one-segment chain puts it in the slots. */
        struct vq_seg piece = {(uint8_t *)seg, 0, s->lens[k]};
        vq_gather(nm, &piece, 1, 0, pos);
        pos = (pos + (s->lens[k] + nm->buf_size - 1) / nm->buf_size) % nm->num_slots;
        seg += s->lens[k];
        out->packets++;
        out->bytes += s->lens[k];
    }
    *used = need;
    return VQ_OFFLOAD_DONE;
}

/* --- enqueue: netmap slots -> guest receive queue ------------------------------------------------------- */

/* rxtx._frame_at: 1 with the fragments and bytes of the frame at `pos` when its last slot is among the
 * `avail` slots from there (and the flags of its first in *first_flags), 0 when it is not, -1 (bad_slot set)
 * at a slot whose len exceeds buf_size: the ring user rewrote it after the kring's checks, and the next
 * txsync prologue reinitialises the ring. */
static int vq_frame_at(const struct nm_bufs *nm, uint32_t pos, uint32_t avail, uint32_t *nfrag, uint64_t *len,
                       uint16_t *first_flags, struct vq_batch *out)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < avail; i++) {
        const struct nm_slot *slot = nm_slot_at(nm, pos);
        uint16_t slot_len = __atomic_load_n(&slot->len, __ATOMIC_RELAXED);
        uint16_t flags = __atomic_load_n(&slot->flags, __ATOMIC_RELAXED);
        if (slot_len > nm->buf_size) {
            out->bad_slot = (int32_t)pos;
            return -1;
        }
        if (i == 0)
            *first_flags = flags;
        total += slot_len;
        if (!(flags & NS_MOREFRAG)) {
            *nfrag = i + 1;
            *len = total;
            return 1;
        }
        if (++pos == nm->num_slots)
            pos = 0;
    }
    return 0;
}

/* The bytes a frame delivers: the virtio-net header, then the buffers of its slots. */
struct vq_source {
    const struct nm_bufs *nm;
    const struct vq_refs *refs; /* may be NULL */
    const uint8_t *p;
    uint32_t left;  /* bytes at p */
    uint32_t slot;  /* next slot */
    uint32_t frags; /* slots not yet read */
    const uint8_t *rest; /* while p is in hdr: the rest of the slot it was in (rest_left bytes) */
    uint32_t rest_left;
    uint8_t hdr[VIRTIO_NET_HDR_SIZE];
};

/* Copy up to `n` bytes of the source to `dst`; returns how many (fewer only if the ring user changed a slot
 * since vq_frame_at measured it: its len and buf_idx are read again here, once, and checked again). */
static uint32_t vq_source_copy(struct vq_source *src, uint8_t *dst, uint32_t n)
{
    uint32_t done = 0;
    while (done < n) {
        if (!src->left) {
            if (src->rest_left) {
                src->p = src->rest;
                src->left = src->rest_left;
                src->rest_left = 0;
                continue;
            }
            if (!src->frags)
                break;
            src->left = nm_slot_data(src->nm, nm_slot_at(src->nm, src->slot), src->refs, &src->p);
            src->frags--;
            if (++src->slot == src->nm->num_slots)
                src->slot = 0;
            continue;
        }
        uint32_t c = n - done < src->left ? n - done : src->left;
        memcpy(dst + done, src->p, c);
        done += c;
        src->p += c;
        src->left -= c;
    }
    return done;
}

/* What vq_source_open found: a frame to write with the header in src->hdr, one to drop, or one whose
 * offloads are to be completed for the driver (the header, in *h, asks for what it did not negotiate). */
enum { VQ_SRC_WRITE, VQ_SRC_DROP, VQ_SRC_COMPLETE };

/* The frame's own virtio-net header (NS_VNET_HDR), which `src` starts with, taken off *frame_len: read into
 * src->hdr (WRITE) when the driver takes what it asks (the receive queue's guest_offloads) and it passes the
 * checks of a transmitted frame's header (read once, here: what is written is what was checked); into *h
 * (COMPLETE) when the driver does not take it; DROP when the frame is shorter than the header or the header
 * fails the checks. Out of the way of plain frames. */
__attribute__((cold, noinline)) static int vq_source_header(uint8_t guest_offloads, struct vq_source *src,
                                                            uint64_t *frame_len, struct nm_vnet_hdr *h)
{
    uint8_t raw[VIRTIO_NET_HDR_SIZE];
    if (*frame_len < sizeof raw || vq_source_copy(src, raw, sizeof raw) != sizeof raw)
        return VQ_SRC_DROP;
    *frame_len -= sizeof raw;
    *h = vq_vnet_hdr(raw);
    h->flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM; /* DATA_VALID and the rest mean nothing from a sender */
    if (nm_offload_needs(h) & ~(uint32_t)guest_offloads)
        return VQ_SRC_COMPLETE;
    uint8_t head[NM_OFF_HEAD_MAX];
    struct vq_source peek = *src;
    uint32_t have = vq_source_copy(&peek, head, *frame_len < sizeof head ? (uint32_t)*frame_len : sizeof head);
    if (nm_offload_check(h, head, have, (uint32_t)*frame_len) != NM_OFF_OK)
        return VQ_SRC_DROP;
    memcpy(src->hdr, raw, VIRTIO_NET_HDR_SIZE - 2);
    src->hdr[0] = h->flags;
    return VQ_SRC_WRITE;
}

/* The source of the frame of `nfrag` slots from `pos` (whose first slot has `first_flags`), with the
 * virtio-net header to write before it: one that asks for nothing, or the frame's own (vq_source_header). */
static inline int vq_source_open(uint8_t guest_offloads, const struct nm_bufs *nm, const struct vq_refs *refs,
                                 uint32_t pos, uint32_t nfrag, uint16_t first_flags, uint64_t *frame_len,
                                 struct vq_source *src, struct nm_vnet_hdr *h)
{
    *src = (struct vq_source){.nm = nm, .refs = refs, .slot = pos, .frags = nfrag}; /* hdr: zeros */
    return first_flags & NS_VNET_HDR ? vq_source_header(guest_offloads, src, frame_len, h) : VQ_SRC_WRITE;
}


/* A frame whose header `h` asks for offloads the driver did not negotiate, `src` after the header: completed
 * into the thread's scratch (nm_offload_complete, as netmap's VALE does for such a port). Its segments'
 * number, 0 when the header is one the frame does not bear out, the frame is larger than VQ_MAX_FRAME (or
 * there is no scratch): it is dropped. */
__attribute__((cold, noinline)) static uint32_t vq_complete_frame(struct vq_source *src,
                                                                  const struct nm_vnet_hdr *h, uint64_t frame_len)
{
    struct vq_offload_scratch *s = frame_len <= VQ_MAX_FRAME ? vq_scratch() : NULL;
    if (!s)
        return 0; /* larger than any guest sends (an application's?), or no memory: not segmented */
    uint32_t got = vq_source_copy(src, s->frame, (uint32_t)frame_len);
    uint32_t nseg;
    if (nm_offload_complete(h, s->frame, got, s->out, VQ_OFFLOAD_OUT, s->lens, VQ_OFFLOAD_SEGS, &nseg) != NM_OFF_OK)
        return 0;
    return nseg;
}

/* --- plain frames: what the batch kernels move without segment lists ------------------------------------ */

/* memcpy for a plain frame, inline when it is short: two copies of 16 or 32 bytes, overlapping, from either
 * end. A call into the library's copy for the 60-odd bytes of a small frame, through the PLT, cost more than
 * the copy (a tenth of a packed switch pass at 64 bytes sat on that call). */
static inline void vq_copy_frame(uint8_t *dst, const uint8_t *src, uint32_t len)
{
    if (len > 64 || len < 16) {
        memcpy(dst, src, len);
    } else if (len > 32) {
        uint8_t a[32], b[32];
        memcpy(a, src, 32);
        memcpy(b, src + len - 32, 32);
        memcpy(dst, a, 32);
        memcpy(dst + len - 32, b, 32);
    } else {
        uint8_t a[16], b[16];
        memcpy(a, src, 16);
        memcpy(b, src + len - 16, 16);
        memcpy(dst, a, 16);
        memcpy(dst + len - 16, b, 16);
    }
}

/* Whether the dequeue takes the chain of one segment `seg` as a plain frame: 1..buf_size bytes (its length in
 * *length) after a header of hdr_len that asks for nothing (or no host offloads), and with `refs` at least
 * min_head of them. The header is read only when host offloads are on. */
static inline int vq_plain_tx(const struct nm_bufs *nm, const struct vq_refs *refs, int host_offloads,
                              uint32_t hdr_len, const struct vq_seg *seg, uint32_t *length)
{
    if (seg->len <= hdr_len)
        return 0;
    uint32_t n = seg->len - hdr_len; /* a segment's len is a descriptor's, 32 bits */
    if (n > nm->buf_size || n > VQ_MAX_FRAME || (refs && n < refs->min_head))
        return 0;
    struct nm_vnet_hdr h;
    if (host_offloads && vq_offload_header(seg, 1, &h))
        return 0;
    *length = n;
    return 1;
}

/* A plain frame of `length` bytes at `data` into the slot at `pos`: referred to by a ticket of `refs` (which
 * has room), or without refs copied into the slot's buffer. */
static inline void vq_plain_into_slot(const struct nm_bufs *nm, struct vq_refs *refs, uint32_t pos,
                                      const uint8_t *data, uint32_t length)
{
    struct nm_slot *slot = nm_slot_at(nm, pos);
    if (refs) {
        uint32_t index = refs->count++;
        refs->refs[index] = (struct vq_ref){data, length};
        slot->ptr = vq_ref_ticket(refs, index);
        nm_close_slot(slot, length, NS_INDIRECT);
    } else {
        vq_copy_frame(nm_slot_buf(nm, slot), data, length);
        nm_close_slot(slot, length, 0);
    }
}

/* Whether the enqueue delivers the slot at `pos` as a plain frame: one slot without a header of its own
 * (NS_VNET_HDR) whose len fits its buffer, or the piece of guest memory its ticket of `refs` (may be NULL)
 * names. Its data and len then in *data, *len. The slot's len, flags and ticket are read once each. */
static inline int vq_plain_slot(const struct nm_bufs *nm, const struct vq_refs *refs, uint32_t pos,
                                const uint8_t **data, uint16_t *len)
{
    const struct nm_slot *slot = nm_slot_at(nm, pos);
    uint16_t n = __atomic_load_n(&slot->len, __ATOMIC_RELAXED);
    uint16_t flags = __atomic_load_n(&slot->flags, __ATOMIC_RELAXED);
    if (n > nm->buf_size || (flags & (NS_MOREFRAG | NS_VNET_HDR)))
        return 0;
    /* nm_slot_data over the values read above. */
    const struct vq_ref *ref =
        refs && (flags & NS_INDIRECT) ? vq_ref_at(refs, __atomic_load_n(&slot->ptr, __ATOMIC_RELAXED)) : NULL;
    if (ref && ref->len < n)
        return 0;
    *data = ref ? ref->host : nm_slot_buf(nm, slot);
    *len = n;
    return 1;
}

/* A plain frame of `len` bytes at `data` into the guest buffer at `host`, which holds it and its 12-byte
 * header: the header scatter writes (zeros, num_buffers 1), stored from registers (copied from a buffer just
 * written in part, its load waited for every store before it, into guest lines the driver's core held), then
 * the frame. */
static inline void vq_plain_write(uint8_t *host, const uint8_t *data, uint16_t len)
{
    const uint64_t hdr_lo = 0;
    const uint32_t hdr_hi = (uint32_t)1 << 16;
    memcpy(host, &hdr_lo, sizeof hdr_lo);
    memcpy(host + sizeof hdr_lo, &hdr_hi, sizeof hdr_hi);
    vq_copy_frame(host + VIRTIO_NET_HDR_SIZE, data, len);
}

/* vq_plain_write into the receive chain of one segment `seg`, the bytes logged when the ring logs. */
static inline void vq_plain_into_chain(const struct vm_memory *mem, int log_dirty, const struct vq_seg *seg,
                                       const uint8_t *data, uint16_t len, struct vq_batch *out)
{
    vq_plain_write(seg->host, data, len);
    if (log_dirty)
        vq_log_write(mem, seg->gpa, VIRTIO_NET_HDR_SIZE + len, out);
}

/* The deliveries of a plain run (vq_plain_into_chain's), deferred to its end, as DPDK's enqueue defers its
 * small copies (batch_copy): done in one tight loop, the run's loads of the source frames (lines of another
 * guest, which another core wrote) are issued back to back and their misses overlap, where a copy among each
 * frame's checks waited for its own miss nearly alone (half a link pass in the far state sat on that load). */
#define VQ_RUN_MAX 32
struct vq_deferred {
    struct vq_copy {
        uint8_t *host;
        const uint8_t *data;
        uint64_t gpa;
        uint16_t len;
    } copy[VQ_RUN_MAX];
    uint32_t n;
};
_Static_assert(VQ_RUN_MAX >= VQ_BATCH && VQ_RUN_MAX >= PVQ_BATCH_MAX, "a run defers up to a batch of frames");

static inline void vq_defer_into_chain(struct vq_deferred *d, const struct vq_seg *seg, const uint8_t *data,
                                       uint16_t len)
{
    d->copy[d->n++] = (struct vq_copy){seg->host, data, seg->gpa, len};
}

/* The deferred deliveries done, then logged (after the bytes they mark are written). */
static inline void vq_deferred_flush(const struct vq_deferred *d, const struct vm_memory *mem, int log_dirty,
                                     struct vq_batch *out)
{
    for (uint32_t k = 0; k < d->n; k++)
        vq_plain_write(d->copy[k].host, d->copy[k].data, d->copy[k].len);
    if (log_dirty)
        for (uint32_t k = 0; k < d->n; k++)
            vq_log_write(mem, d->copy[k].gpa, VIRTIO_NET_HDR_SIZE + d->copy[k].len, out);
}

/* --- the batch kernels, once per ring layout ------------------------------------------------------------ */

/* The batch logic is ring_batch.h's, compiled here twice: for split rings (vq_dequeue_batch,
 * vq_enqueue_batch, ...) and for packed ones (vqp_dequeue_batch, ...). Each instance reaches its ring through
 * the RB_* names defined before it, static inline functions or plain expressions, which the compiler inlines
 * as it did the split ring's own calls before: the split instance is the code it was. */

/* What RB_FN(put) did with a frame. */
enum { VQ_PUT_DONE, VQ_PUT_NO_ROOM, VQ_PUT_FAULT };

/* Split rings: avail->idx counts the chains the driver made available, read once and checked; a chain is
 * named by its head descriptor, given back by moving last_avail_idx back, walked again from its head. */
static inline int32_t vq_ring_pending(const struct vq_split *vq, uint16_t *n, struct vq_batch *out)
{
    *n = (uint16_t)(vq_avail_idx(vq) - vq->last_avail_idx);
    if (*n > vq->num) {
        out->err_value = *n;
        return vq_fail(out, VQ_ERR_AVAIL_IDX, 0);
    }
    return VQ_OK;
}

static inline int32_t vq_ring_rewalk(const struct vq_split *vq, const struct vm_memory *mem, const uint16_t *at,
                                     const struct vq_used_elem *e, struct vq_seg *segs, uint32_t *nseg,
                                     struct vq_batch *out)
{
    struct vq_chain chain;
    (void)at;
    int32_t status = vq_walk(vq, mem, (uint16_t)e->id, 1, segs, VQ_MAX_CHAIN_LENGTH, &chain, out);
    if (status == VQ_OK)
        *nseg = chain.nseg;
    return status;
}

/* The dequeue's plain frames from available entry last_avail_idx on, straight into the slots from `pos` (up
 * to `space` of them and the *npending chains counted): what vq_pop_batch and take_plain (ring_batch.h) do to
 * chains that are plain there (the same checks, slots, tickets, used entries and counters), without the
 * reserve between them, which copied every chain and segment twice. The first chain that is not so and those
 * after it are not touched. Returns the frames taken. */
static inline uint32_t vq_take_run(struct vq_split *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                   struct vq_refs *refs, uint32_t hdr_len, uint32_t pos, uint32_t space,
                                   uint16_t *npending, struct vq_used_elem *pending, struct vq_batch *out)
{
    uint32_t max = space < *npending ? space : *npending;
    if (refs && max > refs->cap - refs->count)
        max = refs->cap - refs->count;
    uint16_t heads[VQ_BATCH];
    struct vq_seg segs[VQ_BATCH];
    const uint32_t n = vq_peek_batch(vq, mem, 0, max, heads, segs), num_slots = nm->num_slots;
    uint64_t bytes = 0;
    uint32_t k;
    for (k = 0; k < n; k++) {
        uint32_t length;
        if (!vq_plain_tx(nm, refs, vq->host_offloads, hdr_len, &segs[k], &length))
            break;
        vq_plain_into_slot(nm, refs, pos, segs[k].host + hdr_len, length);
        pending[k] = (struct vq_used_elem){heads[k], 0};
        bytes += length;
        pos = pos + 1 == num_slots ? 0 : pos + 1;
    }
    vq->last_avail_idx = (uint16_t)(vq->last_avail_idx + k);
    *npending = (uint16_t)(*npending - k);
    out->slots += k;
    out->packets += k;
    out->bytes += bytes;
    return k;
}

/* The enqueue's plain frames from the slots at `pos` (up to `left` of them) straight into the chains from
 * available entry last_avail_idx on (the *npending counted): what put_plain (ring_batch.h) does to slots and
 * chains that are plain there (the same checks, bytes, used entries and counters), without the reserve
 * between them. The first frame that is not so and those after it are not touched. Returns the frames put. */
static inline uint32_t vq_put_run(struct vq_split *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                  const struct vq_refs *refs, uint32_t pos, uint32_t left, uint16_t *npending,
                                  struct vq_used_elem *pending, struct vq_batch *out)
{
    uint16_t heads[VQ_BATCH];
    struct vq_seg segs[VQ_BATCH];
    struct vq_deferred deferred;
    deferred.n = 0;
    const uint32_t n = vq_peek_batch(vq, mem, 1, left < *npending ? left : *npending, heads, segs);
    const uint32_t num_slots = nm->num_slots;
    uint64_t bytes = 0;
    uint32_t k;
    for (k = 0; k < n; k++) {
        const uint8_t *data;
        uint16_t len;
        if (!vq_plain_slot(nm, refs, pos, &data, &len) || segs[k].len < (uint32_t)VIRTIO_NET_HDR_SIZE + len)
            break;
        vq_defer_into_chain(&deferred, &segs[k], data, len);
        pending[k] = (struct vq_used_elem){heads[k], VIRTIO_NET_HDR_SIZE + len};
        bytes += len;
        pos = pos + 1 == num_slots ? 0 : pos + 1;
    }
    vq_deferred_flush(&deferred, mem, vq->log_dirty, out);
    vq->last_avail_idx = (uint16_t)(vq->last_avail_idx + k);
    *npending = (uint16_t)(*npending - k);
    out->packets += k;
    out->bytes += bytes;
    return k;
}

#define RB_TAKE_RUN vq_take_run
#define RB_PUT_RUN vq_put_run
#define RB_FN(name) vq_##name
#define RB_RING struct vq_split
#define RB_ELEM struct vq_used_elem
#define RB_CHAIN struct vq_chain
#define RB_MARK uint16_t
#define RB_HEAD(c) ((c).head)
#define RB_USED(c, l) ((struct vq_used_elem){(c).head, (l)})
#define RB_ARGS_OK vq_args_ok
#define RB_PENDING vq_ring_pending
#define RB_REFILL(vq, n) 0 /* avail->idx is read once a batch */
#define RB_POP vq_pop
#define RB_UNPOP(vq, c) ((void)(c), (vq)->last_avail_idx--)
#define RB_MARK_AT(vq) ((vq)->last_avail_idx)
#define RB_REWIND(vq, mark, elems, n) ((void)(mark), (vq)->last_avail_idx -= (uint16_t)(n))
#define RB_REWALK vq_ring_rewalk
#define RB_NEXT(vq, at, e) ((void)0)
#define RB_COMPLETE vq_complete
#define RB_BATCH VQ_BATCH
#define RB_COUNTED 1 /* a batch takes up to RB_BATCH of the chains avail->idx counted */
#define RB_POP_BATCH vq_pop_batch
#define RB_UNPOP_REST vq_unpop_rest
#define RB_MARK_OF(c) ((c).at)
#include "ring_batch.h"

/* Packed rings (packed_ring.h): single-descriptor chains are taken in groups of PVQ_BATCH, up to
 * PVQ_BATCH_MAX at once, where they can be (pvq_pop_batch, which reads their flags itself), and otherwise the chains available are counted by
 * walking their flags (PackedVirtqueue.pending, no fault), up to the next multiple of PVQ_BATCH, where a batch
 * may be taken again: counting reads each counted chain's flags, lines the driver's core writes, so no further
 * than the next chains taken. Only whether the count is 0 decides anything, and a count that is not 0 stays so
 * until the chains it counted are taken: on a ring the driver does not touch meanwhile, the batch takes exactly
 * the chains the reference's one count finds. A chain is named by its buffer id; chains taken one after the
 * other lie one after the other in the ring, so a position and the descriptors of each (ndesc) find them
 * again, to give back (their ids freed) or walk again. */
struct pvq_mark {
    uint16_t pos;
    uint8_t wrap;
};

static inline int vqp_args_ok(const struct vq_packed *vq, const struct nm_bufs *nm, uint32_t first,
                              uint32_t count)
{
    return vq->desc && vq->driver && vq->device && vq->inflight && vq->num && vq->num <= 32768 &&
           vq->last_avail_idx < vq->num && vq->used_idx < vq->num && nm->slots && nm->base && nm->num_slots &&
           nm->buf_size && nm->nbufs && first < nm->num_slots && count <= nm->num_slots;
}

static inline int32_t vqp_ring_pending(const struct vq_packed *vq, uint16_t *n, struct vq_batch *out)
{
    (void)vq;
    (void)out;
    *n = 0; /* nothing counted yet: a batch or RB_REFILL looks */
    return VQ_OK;
}

/* The chains available up to the next multiple of PVQ_BATCH (at least one). */
static inline uint16_t vqp_ring_refill(const struct vq_packed *vq)
{
    return (uint16_t)pvq_pending_upto(vq, PVQ_BATCH - vq->last_avail_idx % PVQ_BATCH);
}

static inline void vqp_ring_rewind(struct vq_packed *vq, struct pvq_mark mark, const struct vqp_used_elem *elems,
                                   uint32_t n)
{
    for (uint32_t k = 0; k < n; k++)
        if (elems[k].id < vq->num)
            vq->inflight[elems[k].id] = 0;
    vq->last_avail_idx = mark.pos;
    vq->avail_wrap_counter = mark.wrap;
}

static inline int32_t vqp_ring_rewalk(const struct vq_packed *vq, const struct vm_memory *mem,
                                      const struct pvq_mark *at, const struct vqp_used_elem *e,
                                      struct vq_seg *segs, uint32_t *nseg, struct vq_batch *out)
{
    struct vqp_chain chain;
    (void)e;
    int32_t status = pvq_walk(vq, mem, at->pos, at->wrap, 1, segs, VQ_MAX_CHAIN_LENGTH, &chain, out);
    if (status == VQ_OK)
        *nseg = chain.nseg; /* a chain has at most VQ_MAX_CHAIN_LENGTH segments: all stored */
    return status;
}

static inline void vqp_ring_next(const struct vq_packed *vq, struct pvq_mark *at, const struct vqp_used_elem *e)
{
    uint32_t pos = at->pos;
    uint8_t wrap = at->wrap;
    pvq_skip(vq, &pos, &wrap, e->ndesc);
    *at = (struct pvq_mark){(uint16_t)pos, wrap};
}

/* The dequeue's plain frames, a group of PVQ_BATCH at a time, straight from the ring into the slots from `pos`
 * (up to `space` of them): what pvq_pop_batch and take_plain (ring_batch.h) do to a group whose four chains
 * are each plain there (the same checks, slots, tickets, used entries, ids in flight and counters), without
 * the reserve between them, which copied every chain and segment twice (a fifth of a packed dequeue with
 * refs, hot). Nothing while chains are counted (*npending: those are taken one by one). The first group
 * that is not so and those after it are not touched: the dequeue takes them as before. Returns the frames
 * taken, a multiple of PVQ_BATCH. */
static inline uint32_t vqp_take_run(struct vq_packed *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                    struct vq_refs *refs, uint32_t hdr_len, uint32_t pos, uint32_t space,
                                    uint16_t *npending, struct vqp_used_elem *pending, struct vq_batch *out)
{
    if (refs && space > refs->cap - refs->count)
        space = refs->cap - refs->count;
    const uint32_t n = *npending ? 0 : pvq_run_chains(vq, space, 0);
    if (!n)
        return 0;
    uint16_t *const inflight = vq->inflight;
    const uint32_t num = vq->num, num_slots = nm->num_slots;
    const struct vm_region *region = NULL;
    uint32_t at = vq->last_avail_idx, taken = 0;
    uint8_t wrap = vq->avail_wrap_counter;
    uint64_t bytes = 0;
    while (taken < n) {
        struct pvirtq_desc d[PVQ_BATCH];
        struct vq_seg seg[PVQ_BATCH];
        uint32_t length[PVQ_BATCH], k;
        if (!pvq_group_ok(vq->desc, at, num, inflight, mem, &region, d, seg))
            break;
        for (k = 0; k < PVQ_BATCH; k++)
            if (!vq_plain_tx(nm, refs, vq->host_offloads, hdr_len, &seg[k], &length[k]))
                break;
        if (k < PVQ_BATCH)
            break;
        for (k = 0; k < PVQ_BATCH; k++) {
            inflight[d[k].id] = 1;
            vq_plain_into_slot(nm, refs, pos, seg[k].host + hdr_len, length[k]);
            pending[taken + k] = (struct vqp_used_elem){.id = d[k].id, .ndesc = 1, .len = 0};
            bytes += length[k];
            pos = pos + 1 == num_slots ? 0 : pos + 1;
        }
        taken += PVQ_BATCH;
        pvq_skip_in(num, &at, &wrap, PVQ_BATCH);
    }
    vq->last_avail_idx = (uint16_t)at;
    vq->avail_wrap_counter = wrap;
    out->slots += taken;
    out->packets += taken;
    out->bytes += bytes;
    return taken;
}

/* The enqueue's plain frames, a group of PVQ_BATCH at a time, from the slots at `pos` (up to `left` of them)
 * straight into the ring's chains: what put_plain (ring_batch.h) does to four slots in a row and a group of
 * four chains (pvq_pop_batch's) when each frame is plain there (the same checks, bytes, used entries, ids in
 * flight and counters), without the reserve between them. Nothing while chains are counted. The first group
 * that is not so and those after it are not touched. Returns the frames put, a multiple of PVQ_BATCH. */
static inline uint32_t vqp_put_run(struct vq_packed *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                   const struct vq_refs *refs, uint32_t pos, uint32_t left, uint16_t *npending,
                                   struct vqp_used_elem *pending, struct vq_batch *out)
{
    const uint32_t n = *npending ? 0 : pvq_run_chains(vq, left, 1);
    if (!n)
        return 0;
    uint16_t *const inflight = vq->inflight;
    const uint32_t num = vq->num, num_slots = nm->num_slots;
    const struct vm_region *region = NULL;
    uint32_t at = vq->last_avail_idx, put = 0;
    uint8_t wrap = vq->avail_wrap_counter;
    uint64_t bytes = 0;
    struct vq_deferred deferred;
    deferred.n = 0;
    while (put < n) {
        struct pvirtq_desc d[PVQ_BATCH];
        struct vq_seg seg[PVQ_BATCH];
        const uint8_t *data[PVQ_BATCH];
        uint16_t len[PVQ_BATCH];
        if (!pvq_group_ok(vq->desc, at, num, inflight, mem, &region, d, seg))
            break;
        uint32_t k, p = pos;
        for (k = 0; k < PVQ_BATCH; k++) {
            if (!vq_plain_slot(nm, refs, p, &data[k], &len[k]) ||
                d[k].len < (uint32_t)VIRTIO_NET_HDR_SIZE + len[k])
                break;
            p = p + 1 == num_slots ? 0 : p + 1;
        }
        if (k < PVQ_BATCH)
            break;
        for (k = 0; k < PVQ_BATCH; k++) {
            inflight[d[k].id] = 1;
            vq_defer_into_chain(&deferred, &seg[k], data[k], len[k]);
            pending[put + k] =
                (struct vqp_used_elem){.id = d[k].id, .ndesc = 1, .len = VIRTIO_NET_HDR_SIZE + len[k]};
            bytes += len[k];
        }
        pos = p;
        put += PVQ_BATCH;
        pvq_skip_in(num, &at, &wrap, PVQ_BATCH);
    }
    vq_deferred_flush(&deferred, mem, vq->log_dirty, out);
    vq->last_avail_idx = (uint16_t)at;
    vq->avail_wrap_counter = wrap;
    out->packets += put;
    out->bytes += bytes;
    return put;
}

#define RB_TAKE_RUN vqp_take_run
#define RB_PUT_RUN vqp_put_run
#define RB_FN(name) vqp_##name
#define RB_RING struct vq_packed
#define RB_ELEM struct vqp_used_elem
#define RB_CHAIN struct vqp_chain
#define RB_MARK struct pvq_mark
#define RB_HEAD(c) ((c).id)
#define RB_USED(c, l) ((struct vqp_used_elem){.id = (c).id, .ndesc = (c).ndesc, .len = (l)})
#define RB_ARGS_OK vqp_args_ok
#define RB_PENDING vqp_ring_pending
#define RB_REFILL(vq, n) (*(n) = vqp_ring_refill(vq))
#define RB_POP pvq_pop
#define RB_UNPOP pvq_unpop
#define RB_MARK_AT(vq) ((struct pvq_mark){(vq)->last_avail_idx, (vq)->avail_wrap_counter})
#define RB_REWIND vqp_ring_rewind
#define RB_REWALK vqp_ring_rewalk
#define RB_NEXT vqp_ring_next
#define RB_COMPLETE pvq_complete
#define RB_BATCH PVQ_BATCH_MAX
#define RB_COUNTED 0 /* nothing counted: a batch reads the flags itself */
#define RB_POP_BATCH pvq_pop_batch
#define RB_UNPOP_REST pvq_unpop_rest
#define RB_MARK_OF(c) ((struct pvq_mark){(c).pos, (c).wrap})
#include "ring_batch.h"

/* --- the entry points: a batch over memory that vanished counts for nothing ------------------------------ */

/* Whether the front-end shrank a file behind `mem` (guard.c replaced it with zero pages). */
static inline int vm_gone(const struct vm_memory *mem)
{
    return mem->gone && __atomic_load_n(mem->gone, __ATOMIC_ACQUIRE);
}

/* The batch read zeros where the guest's rings and buffers were (or the memory was gone before it started):
 * nothing it did may reach a kring or the used ring, so it reports no slots and nothing pending, and the port
 * marks the device broken. The virtqueue's indexes are left wherever the batch took them: a broken device
 * runs no batch until it is reset, which sets them again. */
static int32_t vq_gone(struct vq_batch *out)
{
    vq_batch_init(out);
    out->status = VQ_ERR_MEMORY_GONE;
    return VQ_ERR_MEMORY_GONE;
}

int32_t vq_dequeue(struct vq_split *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                   uint32_t hdr_len, uint32_t first, uint32_t space, struct vq_used_elem *pending,
                   struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vq_dequeue_batch(vq, mem, nm, hdr_len, first, space, NULL, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}

int32_t vq_dequeue_refs(struct vq_split *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                        uint32_t hdr_len, uint32_t first, uint32_t space, struct vq_refs *refs,
                        struct vq_used_elem *pending, struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vq_dequeue_batch(vq, mem, nm, hdr_len, first, space, refs, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}

int32_t vq_publish(struct vq_split *vq, const struct vm_memory *mem, const struct vq_used_elem *pending,
                   struct vq_batch *out)
{
    /* The frames were read from this memory since the batch: if it went, they were zeros (see vq_gone). */
    if (vm_gone(mem))
        return vq_gone(out);
    vq_complete(vq, mem, pending, out->used, out);
    return VQ_OK;
}

void vq_refs_settle(const struct vq_refs *refs, const struct nm_bufs *nm, uint32_t first, uint32_t count)
{
    if (!refs->count || first >= nm->num_slots)
        return;
    if (count > nm->num_slots)
        count = nm->num_slots;
    for (uint32_t k = 0, i = first; k < count; k++, i = i + 1 == nm->num_slots ? 0 : i + 1) {
        struct nm_slot *slot = nm_slot_at(nm, i);
        uint16_t flags = __atomic_load_n(&slot->flags, __ATOMIC_RELAXED);
        if (!(flags & NS_INDIRECT))
            continue;
        const struct vq_ref *ref = vq_ref_at(refs, __atomic_load_n(&slot->ptr, __ATOMIC_RELAXED));
        if (ref) {
            uint32_t len = __atomic_load_n(&slot->len, __ATOMIC_RELAXED);
            if (len > ref->len)
                len = ref->len; /* a ref is at most buf_size long */
            memcpy(nm_slot_buf(nm, slot), ref->host, len);
        }
        __atomic_store_n(&slot->flags, (uint16_t)(flags & ~NS_INDIRECT), __ATOMIC_RELAXED);
    }
}

void vq_refs_reset(struct vq_refs *refs)
{
    refs->count = 0;
    refs->gen = (refs->gen + 1) & (UINT64_MAX >> VQ_REF_BITS);
}

int32_t vq_enqueue(struct vq_split *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                   uint32_t hdr_len, int32_t mergeable, uint32_t first, uint32_t count,
                   struct vq_used_elem *pending, struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vq_enqueue_batch(vq, mem, nm, hdr_len, mergeable, first, count, NULL, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}

int32_t vq_enqueue_refs(struct vq_split *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                        uint32_t hdr_len, int32_t mergeable, uint32_t first, uint32_t count,
                        const struct vq_refs *refs, struct vq_used_elem *pending, struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vq_enqueue_batch(vq, mem, nm, hdr_len, mergeable, first, count, refs, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}

int32_t vqp_dequeue(struct vq_packed *vq, const struct vm_memory *mem, const struct nm_bufs *nm, uint32_t hdr_len,
                    uint32_t first, uint32_t space, struct vqp_used_elem *pending, struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vqp_dequeue_batch(vq, mem, nm, hdr_len, first, space, NULL, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}

int32_t vqp_enqueue(struct vq_packed *vq, const struct vm_memory *mem, const struct nm_bufs *nm, uint32_t hdr_len,
                    int32_t mergeable, uint32_t first, uint32_t count, struct vqp_used_elem *pending,
                    struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vqp_enqueue_batch(vq, mem, nm, hdr_len, mergeable, first, count, NULL, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}

int32_t vqp_dequeue_refs(struct vq_packed *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                         uint32_t hdr_len, uint32_t first, uint32_t space, struct vq_refs *refs,
                         struct vqp_used_elem *pending, struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vqp_dequeue_batch(vq, mem, nm, hdr_len, first, space, refs, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}

int32_t vqp_publish(struct vq_packed *vq, const struct vm_memory *mem, const struct vqp_used_elem *pending,
                    struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out); /* as vq_publish */
    pvq_complete(vq, mem, pending, out->used, out);
    return VQ_OK;
}

int32_t vqp_enqueue_refs(struct vq_packed *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                         uint32_t hdr_len, int32_t mergeable, uint32_t first, uint32_t count,
                         const struct vq_refs *refs, struct vqp_used_elem *pending, struct vq_batch *out)
{
    if (vm_gone(mem))
        return vq_gone(out);
    int32_t status = vqp_enqueue_batch(vq, mem, nm, hdr_len, mergeable, first, count, refs, pending, out);
    return vm_gone(mem) ? vq_gone(out) : status;
}
