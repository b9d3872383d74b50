/* libFuzzer harness of the split-virtqueue kernels (datapath/virtio.c): the descriptor walk, dequeue,
 * enqueue (mergeable or not) and used-ring publication, on guest memory, descriptor tables, available rings
 * and indexes the input describes (harness.h). FUZZ_MODE picks the entry point (scripts/fuzz builds one
 * binary per mode): 0 walk, 1 dequeue, 2 enqueue, 3 used.
 *
 * virtio.c is included, not linked, so that the walk (vq_walk) and the completion (vq_complete), static
 * there, can be driven directly. */
#include "harness.h"

#include "virtio.c"

#ifndef FUZZ_MODE
#error "FUZZ_MODE must be defined"
#endif

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

static uint16_t used_idx_of(const struct fz_vq *q)
{
    uint16_t v;
    memcpy(&v, q->used + 2, 2);
    return v;
}

/* After a batch that returned VQ_OK: what it published is consistent with what it says it did. */
static void check_published(const struct fz_vq *q, uint16_t used_before, const struct vq_batch *out)
{
    CHECK(out->used <= q->vq.num);
    CHECK((uint16_t)(used_before + out->used) == q->vq.used_idx);
    /* used->idx is only written when entries are published: the input put anything there before. */
    CHECK(out->used == 0 || used_idx_of(q) == q->vq.used_idx);
    CHECK(q->vq.signalled_used == q->vq.used_idx);
    for (uint32_t k = 0; k < out->used; k++) {
        uint32_t id;
        memcpy(&id, q->used + 4 + 8 * ((used_before + k) & (q->vq.num - 1)), 4);
        CHECK(id < q->vq.num);
    }
}

static void walk(struct fz_guest *g, struct fz_vq *q, struct reader *r)
{
    static struct vq_seg segs[VQ_MAX_CHAIN_LENGTH];
    for (uint32_t n = rd_range(r, 1, 4); n; n--) {
        uint16_t head = (uint16_t)rd_range(r, 0, q->vq.num - 1);
        int writable = rd_u8(r) & 1;
        uint32_t cap = rd_u8(r) < 0x80 ? VQ_MAX_CHAIN_LENGTH : rd_range(r, 0, 4);
        struct vq_chain chain;
        struct vq_batch out;
        vq_batch_init(&out);
        if (vq_walk(&q->vq, &g->mem, head, writable, segs, cap, &chain, &out) == VQ_OK) {
            CHECK(chain.head == head);
            CHECK(chain.nseg == VQ_NOT_STORED || chain.nseg <= cap);
            uint64_t total = 0;
            for (uint32_t k = 0; chain.nseg != VQ_NOT_STORED && k < chain.nseg; k++) {
                CHECK(segs[k].len > 0);
                CHECK(in_guest(g, segs[k].host, segs[k].len));
                total += segs[k].len;
            }
            CHECK(chain.nseg == VQ_NOT_STORED || total == chain.len);
        } else {
            CHECK(out.status > VQ_OK && out.status < VQ_ERR_ARGUMENT);
        }
    }
    /* The translation and the dirty log alone, on any range. */
    for (uint32_t n = rd_range(r, 0, 3); n; n--) {
        uint64_t gpa = fz_gpa(g, r), len = rd_u8(r) < 0xF0 ? rd_range(r, 0, 0x5000) : rd_u64(r);
        struct vm_fault fault;
        uint8_t *p = vm_translate(&g->mem, gpa, len, &fault);
        CHECK(!p || len == 0 || in_guest(g, p, len));
        if (g->log)
            vm_log_dirty(g->log, g->mem.log_size, gpa, len);
    }
    CHECK(vq_pending(&q->vq) <= q->vq.num);
}

/* The virtio-net header sizes a port uses (virtio_net_hdr_size): with and without num_buffers. */
static uint32_t hdr_len_of(struct reader *r)
{
    return rd_u8(r) & 1 ? 10 : 12;
}

static void dequeue(struct fz_guest *g, struct fz_vq *q, struct fz_ring *ring, struct reader *r)
{
    uint32_t hdr_len = hdr_len_of(r);
    for (uint32_t round = rd_range(r, 1, 3); round; round--) {
        uint32_t first = rd_range(r, 0, ring->nm.num_slots - 1), space = rd_range(r, 0, ring->nm.num_slots);
        uint16_t used_before = q->vq.used_idx, last_before = q->vq.last_avail_idx;
        struct vq_batch out;
        int32_t status = vq_dequeue(&q->vq, &g->mem, &ring->nm, hdr_len, first, space, q->pending, &out);
        CHECK(status == out.status);
        if (status == VQ_OK) {
            check_published(q, used_before, &out);
            /* Every chain taken is completed (delivered or dropped); nothing else moves. */
            CHECK((uint16_t)(q->vq.last_avail_idx - last_before) == out.used);
            CHECK(out.slots <= space);
            CHECK(out.packets + out.dropped == out.used);
            for (uint32_t k = 0, i = first; k < out.slots; k++, i = (i + 1) % ring->nm.num_slots)
                CHECK(ring->nm.slots[i].len <= ring->nm.buf_size);
        } else {
            CHECK(out.used <= q->vq.num);
            CHECK(q->vq.used_idx == used_before);
        }
        /* The driver moves its index between rounds. */
        uint16_t avail_idx = (uint16_t)(q->vq.last_avail_idx + rd_range(r, 0, q->vq.num));
        memcpy(q->avail + 2, &avail_idx, 2);
    }
}

static void enqueue(struct fz_guest *g, struct fz_vq *q, struct fz_ring *ring, struct reader *r)
{
    uint32_t hdr_len = hdr_len_of(r);
    int32_t mergeable = rd_u8(r) & 1;
    for (uint32_t round = rd_range(r, 1, 3); round; round--) {
        uint32_t first = rd_range(r, 0, ring->nm.num_slots - 1), count = rd_range(r, 0, ring->nm.num_slots);
        uint16_t used_before = q->vq.used_idx, last_before = q->vq.last_avail_idx;
        struct vq_batch out;
        int32_t status =
            vq_enqueue(&q->vq, &g->mem, &ring->nm, hdr_len, mergeable, first, count, q->pending, &out);
        CHECK(status == out.status);
        CHECK(out.slots <= count);
        if (status == VQ_OK) {
            check_published(q, used_before, &out);
            CHECK((uint16_t)(q->vq.last_avail_idx - last_before) == out.used);
            /* One chain per frame without mergeable buffers; a header refused takes none. */
            CHECK(out.bad_headers <= out.dropped);
            CHECK(mergeable || out.packets + out.dropped - out.bad_headers == out.used);
        } else {
            CHECK(out.used <= q->vq.num);
            CHECK(q->vq.used_idx == used_before);
        }
        uint16_t avail_idx = (uint16_t)(q->vq.last_avail_idx + rd_range(r, 0, q->vq.num));
        memcpy(q->avail + 2, &avail_idx, 2);
    }
}

static void used(struct fz_guest *g, struct fz_vq *q, struct reader *r)
{
    for (uint32_t round = rd_range(r, 1, 3); round; round--) {
        uint32_t n = rd_range(r, 0, q->vq.num);
        for (uint32_t k = 0; k < n; k++)
            q->pending[k] = (struct vq_used_elem){rd_range(r, 0, q->vq.num - 1), rd_u32(r)};
        uint16_t used_before = q->vq.used_idx;
        struct vq_batch out;
        vq_batch_init(&out);
        vq_complete(&q->vq, &g->mem, q->pending, n, &out);
        check_published(q, used_before, &out);
        for (uint32_t k = 0; k < n; k++)
            CHECK(memcmp(q->used + 4 + 8 * ((used_before + k) & (q->vq.num - 1)), &q->pending[k], 8) == 0);
        /* The driver may ask for the next interrupt anywhere. */
        uint16_t used_event = rd_u16(r), flags = rd_u8(r) & 1;
        memcpy(q->avail + 4 + 2 * q->vq.num, &used_event, 2);
        memcpy(q->avail, &flags, 2);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = {data, size};
    struct fz_guest g;
    struct fz_vq q;
    struct fz_ring ring;
    fz_guest_build(&g, &r);
    fz_vq_build(&q, &g, &r);
    fz_ring_build(&ring, &r);
    switch (FUZZ_MODE) {
    case 0:
        walk(&g, &q, &r);
        break;
    case 1:
        dequeue(&g, &q, &ring, &r);
        break;
    case 2:
        enqueue(&g, &q, &ring, &r);
        break;
    default:
        used(&g, &q, &r);
        break;
    }
    fz_ring_free(&ring);
    fz_vq_free(&q);
    fz_guest_free(&g);
    return 0;
}
