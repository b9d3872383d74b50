/* A passthrough port's syncs of its guest's rings, one call each (see passthrough.cdef). */
#include "kernels.h"

static inline uint32_t csb_load(const uint32_t *csb, uint32_t word)
{
    return __atomic_load_n(&csb[word], __ATOMIC_ACQUIRE);
}

static inline void csb_store(uint32_t *csb, uint32_t word, uint32_t value)
{
    __atomic_store_n(&csb[word], value, __ATOMIC_RELEASE);
}

static inline uint32_t pt_dist(uint32_t first, uint32_t last, uint32_t n)
{
    return last >= first ? last - first : last + n - first;
}

static inline uint32_t pt_prev(uint32_t i, uint32_t n)
{
    return i ? i - 1 : n - 1;
}

/* Frames and bytes of `n` slots of `b` from `first`: slots of the port's own kring, which the guest cannot
 * rewrite. */
static void pt_count(struct pt_ring *p, const struct nm_bufs *b, uint32_t first, uint32_t n)
{
    for (uint32_t k = 0, i = first; k < n; k++, i = i + 1 == b->num_slots ? 0 : i + 1) {
        p->frames += !(b->slots[i].flags & NS_MOREFRAG);
        p->bytes += b->slots[i].len;
    }
}

/* The guest's head then cur (netmap's order: the guest stores cur, then head), through the kring prologue. */
static int32_t pt_prologue(struct pt_ring *p)
{
    uint32_t head = csb_load(p->atok, PT_ATOK_HEAD);
    uint32_t cur = csb_load(p->atok, PT_ATOK_CUR);
    return nm_user_prologue(p->guest, head, cur, 0);
}

/* hwcur then hwtail to the CSB (netmap's order), rtail = hwtail; an interrupt when hwtail moved and the guest
 * sleeps on the ring. */
static void pt_publish(struct pt_ring *p, uint32_t *notify)
{
    struct nm_kring *g = p->guest;
    int moved = g->nr_hwtail != g->rtail;
    g->rtail = g->nr_hwtail;
    csb_store(p->ktoa, PT_KTOA_HWCUR, g->nr_hwcur);
    csb_store(p->ktoa, PT_KTOA_HWTAIL, g->nr_hwtail);
    if (moved && csb_load(p->atok, PT_ATOK_APPL_NEED_KICK))
        *notify |= PT_INTERRUPT;
}

/* kern_need_kick = on; once on, head looked at again (netmap's double check): moved since the prologue took
 * it, the caller comes back (PT_KICK) rather than wait for a kick the guest may not send. */
static void pt_kicks(struct pt_ring *p, int on, uint32_t *notify)
{
    csb_store(p->ktoa, PT_KTOA_KERN_NEED_KICK, (uint32_t)on);
    if (!on)
        return;
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the store above before the load below */
    if (csb_load(p->atok, PT_ATOK_HEAD) != p->guest->rhead)
        *notify |= PT_KICK;
}

int32_t pt_take(struct pt_ring *p, struct nm_kring *rx, uint32_t *notify)
{
    struct nm_kring *g = p->guest;
    uint32_t gn = g->bufs.num_slots, rn = rx->bufs.num_slots;
    *notify = 0;
    if (pt_prologue(p) < 0)
        return PT_REFUSED;
    uint32_t n = pt_dist(g->nr_hwcur, g->rhead, gn);
    uint32_t space = pt_dist(rx->nr_hwtail, pt_prev(rx->nr_hwcur, rn), rn);
    if (space < n)
        n = space;
    int32_t bad = 0;
    uint32_t copied = n ? nm_copy_slots(&g->bufs, g->nr_hwcur, &rx->bufs, rx->nr_hwtail, n, &bad) : 0;
    pt_count(p, &rx->bufs, rx->nr_hwtail, copied);
    g->nr_hwcur = (g->nr_hwcur + copied) % gn;
    rx->nr_hwtail = (rx->nr_hwtail + copied) % rn;
    /* Copied slots are complete at once: the guest may reuse them. */
    g->nr_hwtail = pt_prev(g->nr_hwcur, gn);
    if (bad)
        return bad == 1 ? PT_BAD_GUEST : PT_BAD_PORT;
    pt_publish(p, notify);
    /* Busy (frames moved: the worker runs this forwarder again) or backlogged (our RX ring is full: its
     * consumer comes back when it drained it): no kicks. Idle: kicks, and the double check. */
    pt_kicks(p, copied == 0 && g->nr_hwcur == g->rhead, notify);
    return PT_OK;
}

int32_t pt_give(struct pt_ring *p, struct nm_kring *tx, uint32_t *notify)
{
    struct nm_kring *g = p->guest;
    uint32_t gn = g->bufs.num_slots, tn = tx->bufs.num_slots;
    *notify = 0;
    if (pt_prologue(p) < 0)
        return PT_REFUSED;
    g->nr_hwcur = g->rhead; /* the slots the guest released */
    uint32_t n = pt_dist(tx->nr_hwcur, tx->rhead, tn);
    uint32_t space = pt_dist(g->nr_hwtail, pt_prev(g->nr_hwcur, gn), gn);
    if (space < n)
        n = space;
    int32_t bad = 0;
    uint32_t copied = n ? nm_copy_slots(&tx->bufs, tx->nr_hwcur, &g->bufs, g->nr_hwtail, n, &bad) : 0;
    pt_count(p, &tx->bufs, tx->nr_hwcur, copied);
    tx->nr_hwcur = (tx->nr_hwcur + copied) % tn;
    g->nr_hwtail = (g->nr_hwtail + copied) % gn;
    if (bad)
        return bad == 1 ? PT_BAD_PORT : PT_BAD_GUEST;
    pt_publish(p, notify);
    tx->nr_hwtail = pt_prev(tx->nr_hwcur, tn);
    /* Frames wait for room in the guest's ring: ask for a kick when it releases slots. */
    pt_kicks(p, tx->nr_hwcur != tx->rhead, notify);
    return PT_OK;
}
