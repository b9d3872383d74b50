/* libFuzzer harness of a passthrough port's syncs (datapath/passthrough.c: pt_take, pt_give) under a hostile
 * guest. The guest's TX and RX rings (slots and buffers in a pool of their own, as in the port's region) and
 * their CSB entries are the guest's to write: between any two syncs the input rewrites the CSB words (head,
 * cur, appl_need_kick, and the daemon's half too, which the guest can scribble on) and any slots (buffer
 * indexes, lengths, flags: anything). The port's krings (the daemon's pool) move as their consumer and
 * producer may: legally. After every call the kernel must have stayed inside the region it was given
 * (AddressSanitizer: every ring, pool and CSB is its own heap block of exactly its size) and left the
 * daemon's state legal: indexes inside the rings, a refused sync changing nothing, what it published to the
 * CSB equal to its kring's hwcur/hwtail, and no copy past the room there was: a TX sync takes no more than the
 * guest handed over ([hwcur, head)) and puts no more in the port's RX kring than it had free; an RX sync
 * fills no more of the guest's ring than it had free (up to hwcur - 1) and takes as many from the port's
 * TX kring as it copied, no more than were pending ([hwcur, head)). A sync that does not return PT_OK is followed by what the Python
 * hook does (PassthroughKring.ring_reinit): the guest ring starts again from hwcur. */
#include "harness.h"

#ifndef FUZZ_MODE
#error "FUZZ_MODE must be defined"
#endif

#define RING_HEADER_SIZE 64
#define CSB_WORDS 16 /* a CSB half, struct nm_csb_atok or nm_csb_ktoa: 64 bytes */

struct fz_pt {
    struct fz_ring ring; /* the guest's slots and buffers */
    uint8_t *header;
    uint32_t *atok, *ktoa; /* each its own block: a word past either half is a report */
    struct nm_kring k;
    struct pt_ring p;
};

static uint32_t fz_dist(uint32_t first, uint32_t last, uint32_t n)
{
    return last >= first ? last - first : last + n - first;
}

static uint32_t fz_prev(uint32_t i, uint32_t n) { return i ? i - 1 : n - 1; }

/* A CSB word as a guest writes it: mostly a ring index, sometimes just past the ring, sometimes anything. */
static uint32_t guest_word(struct reader *r, uint32_t n)
{
    uint8_t how = rd_u8(r);
    return how < 0xE0 ? rd_range(r, 0, n - 1) : how < 0xF0 ? n + (how & 7) : rd_u32(r);
}

/* What the guest writes between syncs: some CSB words and some slots. */
static void guest_writes(struct fz_pt *g, struct reader *r)
{
    uint32_t n = g->k.bufs.num_slots;
    for (uint32_t w = rd_range(r, 0, 3); w; w--) {
        uint8_t which = rd_u8(r);
        uint32_t *half = which & 0x80 ? g->ktoa : g->atok;
        half[which % CSB_WORDS] = (which & 0x40) ? rd_u32(r) : guest_word(r, n);
    }
    for (uint32_t s = rd_range(r, 0, 4); s; s--) {
        struct nm_slot *slot = &g->k.bufs.slots[rd_range(r, 0, n - 1)];
        uint8_t how = rd_u8(r);
        slot->buf_idx = how < 0xC0 ? rd_range(r, 0, g->k.bufs.nbufs - 1) : rd_u32(r);
        slot->len = rd_u16(r);
        slot->flags = rd_u16(r);
    }
}

/* A guest ring (TX when `tx`) whose kring state is the daemon's (legal) and whose CSB and slots are the
 * input's. */
static void fz_pt_build(struct fz_pt *g, struct reader *r, uint32_t tx)
{
    fz_ring_build(&g->ring, r);
    uint32_t n = g->ring.nm.num_slots;
    g->header = calloc(1, RING_HEADER_SIZE);
    g->atok = calloc(CSB_WORDS, 4);
    g->ktoa = calloc(CSB_WORDS, 4);
    uint32_t hwcur = rd_range(r, 0, n - 1);
    /* TX: [hwcur, hwtail] apart by one slot at most until the first sync (the daemon completes at once); RX:
     * anything the daemon may have filled. */
    uint32_t hwtail = tx ? fz_prev(hwcur, n) : rd_range(r, 0, n - 1);
    g->k = (struct nm_kring){
        .ring = g->header,
        .bufs = g->ring.nm,
        .nr_hwcur = hwcur,
        .nr_hwtail = hwtail,
        .rhead = hwcur,
        .rcur = hwcur,
        .rtail = hwtail,
        .tx = tx,
    };
    g->atok[0] = g->atok[1] = hwcur;
    g->ktoa[0] = hwcur;
    g->ktoa[1] = hwtail;
    g->p = (struct pt_ring){.guest = &g->k, .atok = g->atok, .ktoa = g->ktoa};
    guest_writes(g, r);
}

static void fz_pt_free(struct fz_pt *g)
{
    fz_ring_free(&g->ring);
    free(g->header);
    free(g->atok);
    free(g->ktoa);
}

/* One of the port's krings, legal (the daemon's): indexes inside the ring, [hwcur, hwtail) its user's. */
static void fz_port_build(struct fz_ring *ring, struct nm_kring *k, uint8_t **header, struct reader *r,
                          uint32_t tx)
{
    fz_ring_build(ring, r);
    uint32_t n = ring->nm.num_slots;
    *header = calloc(1, RING_HEADER_SIZE);
    uint32_t hwcur = rd_range(r, 0, n - 1), hwtail = rd_range(r, 0, n - 1);
    uint32_t head = (hwcur + rd_range(r, 0, fz_dist(hwcur, hwtail, n))) % n;
    *k = (struct nm_kring){
        .ring = *header,
        .bufs = ring->nm,
        .nr_hwcur = hwcur,
        .nr_hwtail = hwtail,
        .rhead = tx ? head : hwcur,
        .rcur = tx ? head : hwcur,
        .rtail = hwtail,
        .tx = tx,
    };
}

/* The port's side between syncs: the RX kring's consumer releases some of what it holds, the TX kring's
 * producer hands over some of its free slots. */
static void port_moves(struct nm_kring *rx, struct nm_kring *tx, struct reader *r)
{
    uint32_t rn = rx->bufs.num_slots, tn = tx->bufs.num_slots;
    rx->nr_hwcur = (rx->nr_hwcur + rd_range(r, 0, fz_dist(rx->nr_hwcur, rx->nr_hwtail, rn))) % rn;
    tx->rhead = tx->rcur = (tx->rhead + rd_range(r, 0, fz_dist(tx->rhead, tx->nr_hwtail, tn))) % tn;
}

/* What the Python hook does after a sync that did not return PT_OK: the guest ring starts again from hwcur
 * (a TX ring with nothing pending, an RX ring with what it holds), the CSB told. */
static void reinit(struct fz_pt *g)
{
    struct nm_kring *k = &g->k;
    uint32_t n = k->bufs.num_slots;
    k->rhead = k->rcur = k->nr_hwcur;
    if (k->tx)
        k->nr_hwtail = fz_prev(k->nr_hwcur, n);
    k->rtail = k->nr_hwtail;
    g->ktoa[0] = k->nr_hwcur;
    g->ktoa[1] = k->nr_hwtail;
}

static void check_sync(int32_t ret, const struct fz_pt *g, const struct nm_kring *gbefore,
                       const struct nm_kring *port, const struct nm_kring *pbefore, uint32_t notify)
{
    uint32_t gn = g->k.bufs.num_slots, pn = port->bufs.num_slots;
    CHECK(ret == PT_OK || ret == PT_REFUSED || ret == PT_BAD_GUEST || ret == PT_BAD_PORT);
    CHECK(g->k.nr_hwcur < gn && g->k.nr_hwtail < gn && g->k.rhead < gn && g->k.rcur < gn);
    CHECK(port->nr_hwcur < pn && port->nr_hwtail < pn && port->rhead < pn);
    CHECK((notify & ~(uint32_t)(PT_INTERRUPT | PT_KICK)) == 0);
    if (ret == PT_REFUSED) {
        CHECK(memcmp(gbefore, &g->k, sizeof *gbefore) == 0);
        CHECK(memcmp(pbefore, port, sizeof *pbefore) == 0);
        CHECK(notify == 0);
    }
    if (ret == PT_OK) {
        CHECK(g->ktoa[0] == g->k.nr_hwcur && g->ktoa[1] == g->k.nr_hwtail);
        CHECK(g->ktoa[2] <= 1);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = {data, size};
    struct fz_pt gtx, grx; /* the guest's TX ring (pt_take's) and RX ring (pt_give's) */
    fz_pt_build(&gtx, &r, 1);
    fz_pt_build(&grx, &r, 0);
    struct fz_ring rx_ring, tx_ring;
    struct nm_kring rx, tx;
    uint8_t *rx_header, *tx_header;
    fz_port_build(&rx_ring, &rx, &rx_header, &r, 0);
    fz_port_build(&tx_ring, &tx, &tx_header, &r, 1);
    for (uint32_t op = rd_range(&r, 1, 16); op && r.left; op--) {
        uint8_t what = rd_u8(&r);
        uint32_t notify = 0xFFFFFFFF;
        if (what & 1) {
            struct nm_kring gbefore = gtx.k, pbefore = rx;
            uint64_t frames = gtx.p.frames;
            uint32_t gn = gtx.k.bufs.num_slots, rn = rx.bufs.num_slots;
            int32_t ret = pt_take(&gtx.p, &rx, &notify);
            check_sync(ret, &gtx, &gbefore, &rx, &pbefore, notify);
            if (ret != PT_REFUSED) {
                uint32_t copied = fz_dist(gbefore.nr_hwcur, gtx.k.nr_hwcur, gn);
                CHECK(copied <= fz_dist(gbefore.nr_hwcur, gtx.k.rhead, gn)); /* only what was handed over */
                CHECK(fz_dist(pbefore.nr_hwtail, rx.nr_hwtail, rn) == copied % rn);
                CHECK(copied <= fz_dist(pbefore.nr_hwtail, fz_prev(pbefore.nr_hwcur, rn), rn)); /* room */
                CHECK(rx.nr_hwcur == pbefore.nr_hwcur);
            }
            /* Frames are counted on the port's side of the copy: never more than the slots it filled. */
            CHECK(gtx.p.frames - frames <= fz_dist(pbefore.nr_hwtail, rx.nr_hwtail, rn));
            if (ret != PT_OK)
                reinit(&gtx);
        } else {
            struct nm_kring gbefore = grx.k, pbefore = tx;
            uint64_t frames = grx.p.frames;
            uint32_t gn = grx.k.bufs.num_slots, tn = tx.bufs.num_slots;
            int32_t ret = pt_give(&grx.p, &tx, &notify);
            check_sync(ret, &grx, &gbefore, &tx, &pbefore, notify);
            if (ret != PT_REFUSED) {
                uint32_t copied = fz_dist(gbefore.nr_hwtail, grx.k.nr_hwtail, gn);
                /* Room: up to the slot before hwcur, as the guest released it (hwcur = head). */
                CHECK(copied <= fz_dist(gbefore.nr_hwtail, fz_prev(grx.k.nr_hwcur, gn), gn));
                CHECK(fz_dist(pbefore.nr_hwcur, tx.nr_hwcur, tn) == copied % tn);
                CHECK(copied <= fz_dist(pbefore.nr_hwcur, pbefore.rhead, tn)); /* only what was pending */
            }
            CHECK(grx.p.frames - frames <= fz_dist(pbefore.nr_hwcur, tx.nr_hwcur, tn));
            if (ret != PT_OK)
                reinit(&grx);
        }
        guest_writes(what & 2 ? &gtx : &grx, &r);
        port_moves(&rx, &tx, &r);
    }
    fz_pt_free(&gtx);
    fz_pt_free(&grx);
    fz_ring_free(&rx_ring);
    fz_ring_free(&tx_ring);
    free(rx_header);
    free(tx_header);
    return 0;
}
