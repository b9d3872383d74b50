/* libFuzzer harness of the kring kernels (datapath/kring.c) and a vhost-user port's syncs
 * (datapath/vhost_sync.c): FUZZ_MODE 0 the sync prologue and finalize with the ring user's head, cur, tail
 * and slots from the input, then the forwarders' buffer swap and the sink's release; 1 the buffer stash (take
 * and give in any order over any slots); 2 the whole rxsync / txsync of a port (prologue, dequeue or enqueue,
 * stash, finalize) on a kring and a virtqueue from the input; 3 one copy between two guests' queues, as the
 * link and switch passes run it (vq_dequeue_refs, vq_enqueue_refs, vq_refs_settle, vq_publish), with the
 * ring user rewriting slots (and their tickets) in between. */
#include "harness.h"
#include "refs.h"

#ifndef FUZZ_MODE
#error "FUZZ_MODE must be defined"
#endif

#define RING_HEADER_SIZE 64 /* NM_RING_TS + a struct timeval, rounded up */

struct fz_kring {
    struct fz_ring ring;
    uint8_t *header;
    struct nm_kring k;
};

static uint32_t user_index(struct reader *r, uint32_t n)
{
    uint8_t how = rd_u8(r);
    return how < 0xF0 ? rd_range(r, 0, n - 1) : how < 0xF8 ? n + (how & 3) : rd_u32(r);
}

/* A kring whose backend state is mostly legal (indexes inside the ring) and whose user-written header is
 * anything, mostly near the legal values. */
static void fz_kring_build(struct fz_kring *fk, struct reader *r, uint32_t tx)
{
    fz_ring_build(&fk->ring, r);
    uint32_t n = fk->ring.nm.num_slots;
    fk->header = calloc(1, RING_HEADER_SIZE);
    uint32_t words[4] = {user_index(r, n), user_index(r, n), user_index(r, n), rd_u8(r) & 3};
    memcpy(fk->header + NM_RING_HEAD, words, sizeof words);
    fk->k = (struct nm_kring){
        .ring = fk->header,
        .bufs = fk->ring.nm,
        .nr_hwcur = rd_u8(r) < 0xF8 ? rd_range(r, 0, n - 1) : rd_u32(r),
        .nr_hwtail = rd_range(r, 0, n - 1),
        .rhead = rd_range(r, 0, n - 1),
        .rcur = rd_range(r, 0, n - 1),
        .rtail = rd_range(r, 0, n - 1),
        .tx = tx,
    };
}

static void fz_kring_free(struct fz_kring *fk)
{
    fz_ring_free(&fk->ring);
    free(fk->header);
}

static uint32_t word(const struct fz_kring *fk, uint32_t offset)
{
    uint32_t v;
    memcpy(&v, fk->header + offset, 4);
    return v;
}

/* The valid buffer indexes (not reserved, inside the pool) of a ring's slots, counted per index. */
static void count_bufs(const struct nm_bufs *nm, uint32_t *counts, int sign)
{
    for (uint32_t i = 0; i < nm->num_slots; i++)
        if (nm->slots[i].buf_idx >= NM_RESERVED_BUFS && nm->slots[i].buf_idx < nm->nbufs)
            counts[nm->slots[i].buf_idx] += (uint32_t)sign;
}

static void prologue(struct reader *r)
{
    struct fz_kring fk;
    fz_kring_build(&fk, r, rd_u8(r) & 1);
    struct nm_kring before = fk.k;
    uint8_t header_before[RING_HEADER_SIZE];
    memcpy(header_before, fk.header, RING_HEADER_SIZE);
    uint32_t n = fk.ring.nm.num_slots;
    if (nm_sync_prologue(&fk.k) == 0) {
        CHECK(fk.k.rhead < n && fk.k.rcur < n);
        CHECK(word(&fk, NM_RING_TAIL) == fk.k.rtail);
        /* The slots the sync takes were all checked. */
        uint32_t count = (fk.k.rhead + n - fk.k.nr_hwcur) % n;
        CHECK(nm_slots_check(fk.ring.nm.slots, n, fk.k.nr_hwcur, count, fk.ring.nm.nbufs, fk.k.tx ? 1 : 0,
                             fk.k.tx ? fk.ring.nm.buf_size : 0xFFFF) == -1);
    } else {
        /* Refused: nothing touched (the Python prologue says why and reinitialises). */
        CHECK(memcmp(&before, &fk.k, sizeof before) == 0);
        CHECK(memcmp(header_before, fk.header, RING_HEADER_SIZE) == 0);
    }
    if (rd_u8(r) & 1)
        fk.k.nr_hwtail = rd_u32(r);
    if (nm_sync_finalize(&fk.k) == 0)
        CHECK(word(&fk, NM_RING_TAIL) == fk.k.nr_hwtail && fk.k.nr_hwtail < n);
    nm_sync_timestamp(&fk.k);

    /* The forwarders' swap into another kring (as if from one allocator: same pool size), then the sink. */
    struct fz_kring tx;
    fz_kring_build(&tx, r, 1);
    if (tx.ring.nm.nbufs == fk.ring.nm.nbufs) {
        uint32_t *counts = calloc(fk.ring.nm.nbufs, sizeof *counts);
        count_bufs(&fk.ring.nm, counts, 1);
        count_bufs(&tx.ring.nm, counts, 1);
        uint32_t moved = nm_swap_slots(&fk.k, &tx.k, rd_u8(r) < 0x80 ? UINT32_MAX : rd_u8(r));
        CHECK(moved < n && moved < tx.ring.nm.num_slots);
        count_bufs(&fk.ring.nm, counts, -1);
        count_bufs(&tx.ring.nm, counts, -1);
        for (uint32_t b = 0; b < fk.ring.nm.nbufs; b++)
            CHECK(counts[b] == 0); /* buffers move, none is lost or duplicated */
        free(counts);
    }
    uint32_t frames = nm_release_received(&fk.k, NULL);
    CHECK(frames < n);
    nm_hand_all(&tx.k);
    CHECK(word(&tx, NM_RING_HEAD) == word(&tx, NM_RING_TAIL));
    fz_kring_free(&tx);
    fz_kring_free(&fk);
}

/* A stash of 0..16 valid buffers with its cursor anywhere in it. */
static void fz_stash_build(struct nm_stash *s, struct reader *r, uint32_t nbufs)
{
    s->size = nbufs > NM_RESERVED_BUFS ? rd_range(r, 0, 16) : 0;
    s->bufs = malloc(sizeof *s->bufs * (s->size ? s->size : 1));
    for (uint32_t i = 0; i < s->size; i++)
        s->bufs[i] = rd_range(r, NM_RESERVED_BUFS, nbufs - 1);
    s->cursor = s->size ? rd_range(r, 0, s->size - 1) : 0;
}

static void stash(struct reader *r)
{
    struct fz_ring ring;
    fz_ring_build(&ring, r);
    struct nm_stash s;
    fz_stash_build(&s, r, ring.nm.nbufs);
    uint32_t *counts = calloc(ring.nm.nbufs, sizeof *counts);
    count_bufs(&ring.nm, counts, 1);
    for (uint32_t i = 0; i < s.size; i++)
        counts[s.bufs[i]]++;
    for (uint32_t op = rd_range(r, 1, 8); op; op--) {
        uint32_t first = rd_u8(r) < 0xF0 ? rd_range(r, 0, ring.nm.num_slots - 1) : rd_u32(r);
        uint32_t count = rd_range(r, 0, ring.nm.num_slots);
        if (rd_u8(r) & 1)
            nm_stash_take(&s, &ring.nm, first, count);
        else
            nm_stash_give(&s, &ring.nm, first, count);
        CHECK(s.size == 0 || s.cursor < s.size);
        for (uint32_t i = 0; i < s.size; i++)
            CHECK(s.bufs[i] >= NM_RESERVED_BUFS && s.bufs[i] < ring.nm.nbufs);
    }
    count_bufs(&ring.nm, counts, -1);
    for (uint32_t i = 0; i < s.size; i++)
        counts[s.bufs[i]]--;
    for (uint32_t b = 0; b < ring.nm.nbufs; b++)
        CHECK(counts[b] == 0); /* buffers are exchanged, never lost or duplicated */
    free(counts);
    free(s.bufs);
    fz_ring_free(&ring);
}

static void port_sync(struct reader *r)
{
    struct fz_guest g;
    struct fz_vq q;
    fz_guest_build(&g, r);
    fz_vq_build(&q, &g, r);
    uint32_t tx = rd_u8(r) & 1;
    struct fz_kring fk;
    fz_kring_build(&fk, r, tx);
    struct nm_stash s;
    fz_stash_build(&s, r, fk.ring.nm.nbufs);
    uint32_t hdr_len = rd_u8(r) & 1 ? 10 : 12;
    int32_t mergeable = rd_u8(r) & 1;
    uint32_t n = fk.ring.nm.num_slots;
    for (uint32_t round = rd_range(r, 1, 3); round; round--) {
        struct vq_batch out;
        struct nm_stash *sp = rd_u8(r) & 1 ? &s : NULL;
        int32_t status = tx ? vhu_txsync(&fk.k, &q.vq, &g.mem, hdr_len, mergeable, sp, q.pending, &out)
                            : vhu_rxsync(&fk.k, &q.vq, &g.mem, hdr_len, sp, q.pending, &out);
        CHECK(status == VHU_REJECT || (status >= VQ_OK && status <= VQ_ERR_SHORT_RX));
        if (status != VHU_REJECT) {
            CHECK(fk.k.nr_hwcur < n && fk.k.nr_hwtail < n);
            CHECK(word(&fk, NM_RING_TAIL) == fk.k.nr_hwtail);
        }
        /* The user moves head and cur, the driver its available index. */
        uint32_t head = user_index(r, n);
        memcpy(fk.header + NM_RING_HEAD, &head, 4);
        memcpy(fk.header + NM_RING_CUR, &head, 4);
        uint16_t avail_idx = (uint16_t)(q.vq.last_avail_idx + rd_range(r, 0, q.vq.num));
        memcpy(q.avail + 2, &avail_idx, 2);
    }
    free(s.bufs);
    fz_kring_free(&fk);
    fz_vq_free(&q);
    fz_guest_free(&g);
}

/* Whether [p, p + len) lies inside one of the guest's regions. */
static int in_guest(const struct fz_guest *g, const uint8_t *p, uint32_t len)
{
    for (uint32_t i = 0; i < g->mem.nregions; i++) {
        const uint8_t *base = (const uint8_t *)(uintptr_t)g->regions[i].host;
        if (p >= base && len <= g->regions[i].size && (uint64_t)(p - base) <= g->regions[i].size - len)
            return 1;
    }
    return 0;
}

static void one_copy(struct reader *r)
{
    struct fz_guest g, h;
    struct fz_vq src, dst;
    fz_guest_build(&g, r);
    fz_vq_build(&src, &g, r);
    fz_guest_build(&h, r);
    fz_vq_build(&dst, &h, r);
    struct fz_ring ring;
    fz_ring_build(&ring, r);
    uint32_t n = ring.nm.num_slots;
    struct vq_refs refs = {.cap = rd_range(r, 1, n), .gen = rd_u64(r) >> VQ_REF_BITS};
    refs.refs = calloc(refs.cap, sizeof *refs.refs);
    refs.min_head = rd_u8(r) & 1 ? SW_ETH_HLEN : 0;
    uint32_t hdr_len = rd_u8(r) & 1 ? 10 : 12;
    int32_t mergeable = rd_u8(r) & 1;
    for (uint32_t round = rd_range(r, 1, 3); round; round--) {
        struct vq_batch out, delivered;
        uint32_t first = rd_range(r, 0, n - 1), space = rd_range(r, 0, n);
        int32_t status = vq_dequeue_refs(&src.vq, &g.mem, &ring.nm, hdr_len, first, space, &refs, src.pending,
                                         &out);
        CHECK(status >= VQ_OK && status <= VQ_ERR_MEMORY_GONE);
        CHECK(refs.count <= refs.cap);
        for (uint32_t i = 0; i < refs.count; i++)
            CHECK(refs.refs[i].len && refs.refs[i].len <= ring.nm.buf_size &&
                  in_guest(&g, refs.refs[i].host, refs.refs[i].len));
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
            int32_t st = vq_enqueue_refs(&dst.vq, &h.mem, &ring.nm, hdr_len, mergeable, first, count, &refs,
                                         dst.pending, &delivered);
            CHECK(st >= VQ_OK && st <= VQ_ERR_MEMORY_GONE);
            vq_refs_settle(&refs, &ring.nm, first, out.slots);
            /* Nothing refers once settled (a flag the user set with a void ticket refers to nothing). */
            for (uint32_t k = 0, i = first; k < out.slots; k++, i = (i + 1) % n)
                CHECK(!(ring.nm.slots[i].flags & NS_INDIRECT) || !vq_ref_at(&refs, ring.nm.slots[i].ptr));
            status = vq_publish(&src.vq, &g.mem, src.pending, &out);
            CHECK(status == VQ_OK || status == VQ_ERR_MEMORY_GONE);
        }
        vq_refs_reset(&refs);
        CHECK(refs.count == 0);
        uint16_t avail_idx = (uint16_t)(src.vq.last_avail_idx + rd_range(r, 0, src.vq.num));
        memcpy(src.avail + 2, &avail_idx, 2);
    }
    free(refs.refs);
    fz_ring_free(&ring);
    fz_vq_free(&dst);
    fz_guest_free(&h);
    fz_vq_free(&src);
    fz_guest_free(&g);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = {data, size};
    switch (FUZZ_MODE) {
    case 0:
        prologue(&r);
        break;
    case 1:
        stash(&r);
        break;
    case 2:
        port_sync(&r);
        break;
    default:
        one_copy(&r);
        break;
    }
    return 0;
}
