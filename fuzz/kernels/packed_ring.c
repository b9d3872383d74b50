/* libFuzzer harness of the packed-ring kernels (datapath/packed.c, packed_ring.h): a hostile driver's
 * descriptor ring, event suppression areas, wrap counters and buffer ids (harness.h builds the guest memory),
 * and, by FUZZ_MODE:
 *   0  a device that pops chains, gives some back, and publishes used descriptors for what it popped, while
 *      the driver rewrites descriptors between calls (vqp_pop, vqp_unpop, vqp_complete);
 *   1  whole dequeue batches into a netmap ring (vqp_dequeue), offloads on or off, the driver rewriting
 *      descriptors between batches;
 *   2  whole enqueue batches from a netmap ring (vqp_enqueue), mergeable or not, frames with their headers
 *      (NS_VNET_HDR) among them;
 *   3  one copy between two guests' packed rings, as the link and switch passes run it (vqp_dequeue_refs,
 *      vqp_enqueue_refs, vq_refs_settle, vqp_publish), the ring user rewriting slots (and their tickets) in
 *      between.
 *
 * packed.c and virtio.c (whose address translation and dirty log it uses) are included, not linked. */
#include "harness.h"

#include "virtio.c"

#include "packed.c"

#define FZ_MAX_POPPED 64

/* Whether [p, p + len) lies inside one of the guest's regions (what every translated address must). */
static int in_guest(const struct fz_guest *g, const uint8_t *p, uint64_t len)
{
    for (uint32_t i = 0; i < g->mem.nregions; i++) {
        const uint8_t *b = g->blocks[i];
        if (p >= b && len <= g->regions[i].size && (uint64_t)(p - b) <= g->regions[i].size - len)
            return 1;
    }
    return 0;
}

struct fz_packed {
    struct vq_packed vq;
    uint8_t *desc, *driver, *device;
    uint16_t *inflight;
};

/* A descriptor as the driver writes it: address and length mostly inside guest memory; the id mostly a
 * valid one; AVAIL and USED as a driver with wrap counter `wrap` makes it available, or anything; NEXT,
 * WRITE and INDIRECT in any combination. */
static void fz_packed_desc(const struct fz_guest *g, struct reader *r, uint8_t *at, uint32_t num, uint8_t wrap)
{
    uint64_t addr = fz_gpa(g, r);
    uint8_t lk = rd_u8(r);
    uint32_t len = lk < 0xC0 ? rd_range(r, 0, 300) : lk < 0xF0 ? rd_range(r, 0, 16) * 16 : rd_u32(r);
    uint16_t id = rd_u8(r) < 0xF0 ? (uint16_t)rd_range(r, 0, num - 1) : rd_u16(r);
    uint8_t how = rd_u8(r);
    uint16_t flags = how & 0x07; /* NEXT, WRITE, INDIRECT */
    if (how & 0x80)
        flags |= rd_u16(r) & (VRING_PACKED_DESC_F_AVAIL_MASK | VRING_PACKED_DESC_F_USED_MASK);
    else if (wrap) /* available: AVAIL equal to the wrap counter, USED its inverse */
        flags |= VRING_PACKED_DESC_F_AVAIL_MASK;
    else
        flags |= VRING_PACKED_DESC_F_USED_MASK;
    memcpy(at, &addr, 8);
    memcpy(at + PVQ_LEN_OFFSET, &len, 4);
    memcpy(at + PVQ_ID_OFFSET, &id, 2);
    memcpy(at + PVQ_FLAGS_OFFSET, &flags, 2);
}

/* A ring of 1..64 descriptors (any size: a packed ring need not be a power of two), each area in a block of
 * exactly its size; positions, wrap counters and features from the input; indirect tables written into
 * guest regions. */
static void fz_packed_build(struct fz_packed *q, const struct fz_guest *g, struct reader *r)
{
    memset(q, 0, sizeof *q);
    uint32_t num = rd_range(r, 1, 64);
    q->desc = malloc(PVQ_DESC_SIZE * num);
    q->driver = malloc(PVQ_EVENT_SIZE);
    q->device = malloc(PVQ_EVENT_SIZE);
    q->inflight = calloc(num, sizeof *q->inflight);
    uint8_t wrap = rd_u8(r) & 1;
    uint32_t last_avail = rd_range(r, 0, num - 1);
    for (uint32_t i = 0; i < num; i++) /* behind last_avail the driver is a lap ahead: the other wrap */
        fz_packed_desc(g, r, q->desc + PVQ_DESC_SIZE * i, num, i < last_avail ? !wrap : wrap);
    for (uint32_t t = rd_range(r, 0, 2); t && g->mem.nregions; t--) {
        const struct vm_region *reg = &g->regions[rd_u8(r) % g->mem.nregions];
        uint32_t entries = rd_range(r, 1, 8);
        if (reg->size < PVQ_DESC_SIZE * entries)
            continue;
        uint32_t off = rd_range(r, 0, (uint32_t)reg->size - PVQ_DESC_SIZE * entries);
        for (uint32_t i = 0; i < entries; i++)
            fz_packed_desc(g, r, (uint8_t *)(uintptr_t)reg->host + off + PVQ_DESC_SIZE * i, num, 1);
    }
    rd_fill(r, q->driver, PVQ_EVENT_SIZE);
    rd_fill(r, q->device, PVQ_EVENT_SIZE);
    uint8_t feat = rd_u8(r);
    q->vq = (struct vq_packed){
        .desc = q->desc,
        .driver = q->driver,
        .device = q->device,
        .inflight = q->inflight,
        .desc_log_addr = fz_gpa(g, r),
        .device_log_addr = fz_gpa(g, r),
        .num = num,
        .last_avail_idx = (uint16_t)last_avail,
        .used_idx = (uint16_t)rd_range(r, 0, num - 1),
        .signalled_used = (uint16_t)rd_range(r, 0, num - 1),
        .avail_wrap_counter = wrap,
        .used_wrap_counter = rd_u8(r) & 1,
        .signalled_used_wrap = rd_u8(r) & 1,
        .event_idx = feat & 1,
        .indirect = (feat >> 1) & 1,
        .in_order = (feat >> 2) & 1,
        .log_dirty = (feat >> 3) & 1,
        .log_rings = (feat >> 4) & 1,
        .kicks = (feat >> 5) & 1,
    };
}

static void fz_packed_free(struct fz_packed *q)
{
    free(q->desc);
    free(q->driver);
    free(q->device);
    free(q->inflight);
}

/* A chain pop returned: consistent with the ring it came from and the segments it stored. */
static void check_popped(const struct fz_guest *g, const struct fz_packed *q, const struct vqp_chain *c,
                         const struct vq_seg *segs, uint32_t cap)
{
    CHECK(c->id < q->vq.num && q->vq.inflight[c->id] == c->ndesc);
    CHECK(c->ndesc >= 1 && c->ndesc <= q->vq.num && c->ndesc <= VQ_MAX_CHAIN_LENGTH);
    CHECK(c->pos < q->vq.num && q->vq.last_avail_idx < q->vq.num);
    CHECK(c->nseg == VQ_NOT_STORED || c->nseg <= cap);
    uint64_t total = 0;
    for (uint32_t k = 0; c->nseg != VQ_NOT_STORED && k < c->nseg; k++) {
        CHECK(segs[k].len > 0 && in_guest(g, segs[k].host, segs[k].len));
        total += segs[k].len;
    }
    CHECK(c->nseg == VQ_NOT_STORED || total == c->len);
}

/* How many buffer ids are in flight. */
static uint32_t in_flight(const struct fz_packed *q)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < q->vq.num; i++)
        n += q->vq.inflight[i] != 0;
    return n;
}

/* Whole batches (mode 1: dequeue, 2: enqueue). A batch that went through completed every chain it took and
 * gave back every one it did not (ids in flight as before); one that faulted published nothing. After a
 * fault the device is broken: no more batches. */
static void batches(struct fz_guest *g, struct fz_packed *q, struct reader *r, int writable)
{
    struct fz_ring ring;
    fz_ring_build(&ring, r);
    struct vqp_used_elem *pending = calloc(q->vq.num, sizeof *pending);
    uint32_t hdr_len = rd_u8(r) & 1 ? 10 : 12;
    int32_t mergeable = rd_u8(r) & 1;
    uint8_t offloads = rd_u8(r);
    q->vq.host_offloads = offloads & 1;
    q->vq.pass_offloads = rd_u8(r);
    q->vq.guest_offloads = rd_u8(r);
    for (uint32_t round = rd_range(r, 1, 4); round; round--) {
        uint32_t first = rd_range(r, 0, ring.nm.num_slots - 1), n = rd_range(r, 0, ring.nm.num_slots);
        uint32_t used_before = q->vq.used_idx, flying = in_flight(q);
        uint8_t wrap_before = q->vq.used_wrap_counter;
        struct vq_batch out;
        int32_t status = writable ? vqp_enqueue(&q->vq, &g->mem, &ring.nm, hdr_len, mergeable, first, n, pending, &out)
                                  : vqp_dequeue(&q->vq, &g->mem, &ring.nm, hdr_len, first, n, pending, &out);
        CHECK(status == out.status && status != VQ_ERR_ARGUMENT);
        CHECK(out.slots <= n && out.used <= q->vq.num);
        CHECK(q->vq.last_avail_idx < q->vq.num && q->vq.used_idx < q->vq.num);
        if (status != VQ_OK) {
            CHECK(q->vq.used_idx == used_before && q->vq.used_wrap_counter == wrap_before);
            for (uint32_t k = 0; k < out.used; k++) /* what it would have published: chains it took */
                CHECK(pending[k].id < q->vq.num && q->vq.inflight[pending[k].id] == pending[k].ndesc);
            break;
        }
        CHECK(in_flight(q) == flying);
        CHECK(out.bad_headers <= out.dropped);
        if (!writable) {
            for (uint32_t k = 0, i = first; k < out.slots; k++, i = (i + 1) % ring.nm.num_slots)
                CHECK(ring.nm.slots[i].len <= ring.nm.buf_size);
        } else {
            CHECK(mergeable || out.offloaded || out.packets + out.dropped - out.bad_headers == out.used);
        }
        if (out.used) { /* the batch's first used descriptor says used in the wrap counter of that moment */
            uint16_t flags;
            memcpy(&flags, q->desc + PVQ_DESC_SIZE * used_before + PVQ_FLAGS_OFFSET, 2);
            CHECK(!!(flags & VRING_PACKED_DESC_F_AVAIL_MASK) == wrap_before);
            CHECK(!!(flags & VRING_PACKED_DESC_F_USED_MASK) == wrap_before);
        }
        /* The driver makes descriptors available again (or not) between batches. */
        for (uint32_t m = rd_range(r, 0, 6); m; m--) {
            uint32_t i = rd_range(r, 0, q->vq.num - 1);
            fz_packed_desc(g, r, q->desc + PVQ_DESC_SIZE * i, q->vq.num, rd_u8(r) & 1);
        }
        rd_fill(r, q->driver, PVQ_EVENT_SIZE);
    }
    free(pending);
    fz_ring_free(&ring);
}

/* Mode 3: frames from `src`'s guest `g` to `dst`'s guest `h` through slots that refer to g's buffers. Every
 * ticket names a piece of g inside it; once settled no slot refers; a source batch that went through is
 * published whole (its ids no longer in flight); a fault leaves the used position alone. */
static void one_copy(struct fz_guest *g, struct fz_packed *src, struct reader *r)
{
    struct fz_guest h;
    struct fz_packed dst;
    fz_guest_build(&h, r);
    fz_packed_build(&dst, &h, r);
    struct fz_ring ring;
    fz_ring_build(&ring, r);
    uint32_t n = ring.nm.num_slots;
    struct vq_refs refs = {.cap = rd_range(r, 1, n), .gen = rd_u64(r) >> VQ_REF_BITS};
    refs.refs = calloc(refs.cap, sizeof *refs.refs);
    refs.min_head = rd_u8(r) & 1 ? SW_ETH_HLEN : 0;
    struct vqp_used_elem *src_pending = calloc(src->vq.num, sizeof *src_pending);
    struct vqp_used_elem *dst_pending = calloc(dst.vq.num, sizeof *dst_pending);
    uint32_t hdr_len = rd_u8(r) & 1 ? 10 : 12;
    int32_t mergeable = rd_u8(r) & 1;
    for (uint32_t round = rd_range(r, 1, 3); round; round--) {
        struct vq_batch out, delivered;
        uint32_t first = rd_range(r, 0, n - 1), space = rd_range(r, 0, n);
        uint32_t used_before = src->vq.used_idx;
        int32_t status =
            vqp_dequeue_refs(&src->vq, &g->mem, &ring.nm, hdr_len, first, space, &refs, src_pending, &out);
        CHECK(status == out.status && status != VQ_ERR_ARGUMENT);
        CHECK(src->vq.used_idx == used_before); /* nothing published before the frames were copied */
        CHECK(refs.count <= refs.cap);
        for (uint32_t i = 0; i < refs.count; i++)
            CHECK(refs.refs[i].len && refs.refs[i].len <= ring.nm.buf_size &&
                  in_guest(g, refs.refs[i].host, refs.refs[i].len));
        for (uint32_t k = 0; k < out.used; k++) { /* chains it took, in flight until published */
            const struct vqp_used_elem *e = &src_pending[k];
            CHECK(e->id < src->vq.num && src->vq.inflight[e->id] == e->ndesc);
        }
        if (status == VQ_OK) {
            CHECK(out.slots <= space);
            /* The ring user rewrites slots: tickets of other generations or indexes, flags, lengths. */
            for (uint32_t k = rd_range(r, 0, 3); k; k--) {
                struct nm_slot *slot = &ring.nm.slots[rd_range(r, 0, n - 1)];
                slot->ptr = rd_u8(r) & 1 ? vq_ref_ticket(&refs, rd_range(r, 0, refs.cap)) : rd_u64(r);
                slot->flags = rd_u16(r);
                slot->len = rd_u16(r);
            }
            uint32_t count = out.slots ? rd_range(r, 0, out.slots) : 0;
            int32_t st = vqp_enqueue_refs(&dst.vq, &h.mem, &ring.nm, hdr_len, mergeable, first, count, &refs,
                                          dst_pending, &delivered);
            CHECK(st == delivered.status && st != VQ_ERR_ARGUMENT && delivered.slots <= count);
            vq_refs_settle(&refs, &ring.nm, first, out.slots);
            /* Nothing refers once settled (a flag the user set with a void ticket refers to nothing). */
            for (uint32_t k = 0, i = first; k < out.slots; k++, i = (i + 1) % n)
                CHECK(!(ring.nm.slots[i].flags & NS_INDIRECT) || !vq_ref_at(&refs, ring.nm.slots[i].ptr));
            status = vqp_publish(&src->vq, &g->mem, src_pending, &out);
            CHECK(status == VQ_OK);
            for (uint32_t k = 0; k < out.used; k++)
                CHECK(src->vq.inflight[src_pending[k].id] == 0);
        }
        vq_refs_reset(&refs);
        CHECK(refs.count == 0);
        if (status != VQ_OK)
            break; /* the device is broken */
        for (uint32_t m = rd_range(r, 0, 6); m; m--) { /* the source's driver makes more available */
            uint32_t i = rd_range(r, 0, src->vq.num - 1);
            fz_packed_desc(g, r, src->desc + PVQ_DESC_SIZE * i, src->vq.num, rd_u8(r) & 1);
        }
    }
    free(src_pending);
    free(dst_pending);
    free(refs.refs);
    fz_ring_free(&ring);
    fz_packed_free(&dst);
    fz_guest_free(&h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct vq_seg segs[VQ_MAX_CHAIN_LENGTH];
    struct reader r = {data, size};
    struct fz_guest g;
    struct fz_packed q;
    fz_guest_build(&g, &r);
    fz_packed_build(&q, &g, &r);
    if (FUZZ_MODE == 3) {
        one_copy(&g, &q, &r);
        fz_packed_free(&q);
        fz_guest_free(&g);
        return 0;
    }
    if (FUZZ_MODE) {
        batches(&g, &q, &r, FUZZ_MODE == 2);
        fz_packed_free(&q);
        fz_guest_free(&g);
        return 0;
    }
    struct vqp_chain popped[FZ_MAX_POPPED];
    uint32_t npopped = 0;
    for (uint32_t step = rd_range(&r, 1, 16); step; step--) {
        uint8_t op = rd_u8(&r) % 4;
        CHECK(vqp_pending(&q.vq) <= q.vq.num);
        if (op <= 1 && npopped < FZ_MAX_POPPED) { /* pop, sometimes giving the chain back at once */
            struct vq_packed before = q.vq;
            uint32_t cap = rd_u8(&r) < 0x80 ? VQ_MAX_CHAIN_LENGTH : rd_range(&r, 0, 4);
            struct vqp_chain c;
            struct vq_batch out;
            vq_batch_init(&out);
            if (vqp_pop(&q.vq, &g.mem, rd_u8(&r) & 1, segs, cap, &c, &out) == VQ_OK) {
                check_popped(&g, &q, &c, segs, cap);
                if (op == 1) {
                    vqp_unpop(&q.vq, &c);
                    CHECK(q.vq.last_avail_idx == before.last_avail_idx);
                    CHECK(q.vq.avail_wrap_counter == before.avail_wrap_counter && !q.vq.inflight[c.id]);
                } else {
                    popped[npopped++] = c;
                }
            } else {
                /* A fault takes nothing. */
                CHECK(out.status > VQ_OK && out.status != VQ_ERR_ARGUMENT);
                CHECK(q.vq.last_avail_idx == before.last_avail_idx);
                CHECK(q.vq.avail_wrap_counter == before.avail_wrap_counter);
            }
        } else if (op == 2 && npopped) { /* publish the oldest chains popped, lengths as a device writes them */
            uint32_t n = rd_range(&r, 1, npopped);
            struct vqp_used_elem used[FZ_MAX_POPPED];
            for (uint32_t k = 0; k < n; k++) {
                uint32_t len = rd_u8(&r) & 1 ? 0 : (uint32_t)(popped[k].len < UINT32_MAX ? popped[k].len : 0);
                used[k] = (struct vqp_used_elem){popped[k].id, popped[k].ndesc, len};
            }
            uint32_t first = q.vq.used_idx;
            uint8_t wrap = q.vq.used_wrap_counter;
            struct vq_batch out;
            vq_batch_init(&out);
            vqp_complete(&q.vq, &g.mem, used, n, &out);
            CHECK(out.status == VQ_OK && out.used == n);
            CHECK(q.vq.used_idx < q.vq.num);
            for (uint32_t k = 0; k < n; k++)
                CHECK(q.vq.inflight[used[k].id] == 0);
            /* The batch's first used descriptor says used in the device's wrap counter of that moment. */
            uint16_t flags;
            memcpy(&flags, q.desc + PVQ_DESC_SIZE * first + PVQ_FLAGS_OFFSET, 2);
            CHECK(!!(flags & VRING_PACKED_DESC_F_AVAIL_MASK) == wrap);
            CHECK(!!(flags & VRING_PACKED_DESC_F_USED_MASK) == wrap);
            memmove(popped, popped + n, (npopped - n) * sizeof *popped);
            npopped -= n;
        } else { /* the driver rewrites descriptors and its event suppression area meanwhile */
            for (uint32_t n = rd_range(&r, 1, 4); n; n--) {
                uint32_t i = rd_range(&r, 0, q.vq.num - 1);
                fz_packed_desc(&g, &r, q.desc + PVQ_DESC_SIZE * i, q.vq.num, rd_u8(&r) & 1);
            }
            rd_fill(&r, q.driver, PVQ_EVENT_SIZE);
        }
    }
    fz_packed_free(&q);
    fz_guest_free(&g);
    return 0;
}
