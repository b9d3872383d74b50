/* A vhost-user port's kring syncs in one call each (see vhost_sync.cdef). */
#include <string.h>
#include <linux/if_ether.h> /* ETH_FRAME_LEN */

#include "kernels.h"

/* The interrupt the driver asked for (kernels.finish does the same after a per-sync batch): VQ_OK, or the
 * VHU_EVENTFD_* status of a call eventfd that refused it (the sync itself is done and counted). `calls`: the
 * ring's count of interrupts sent. */
static int32_t vhu_notify(const struct vhu_queue *q, uint64_t *calls)
{
    if (!q->out->notify || q->call_fd < 0)
        return VQ_OK;
    int32_t status = vhu_eventfd_signal(q->call_fd);
    if (status == VHU_EVENTFD_OK)
        (*calls)++;
    return status;
}

/* The counters and the interrupt of a receive batch that went through and was published. */
static int32_t vhu_received(const struct vhu_queue *q, uint64_t *calls)
{
    q->stats->rx_packets += q->out->packets;
    q->stats->rx_bytes += q->out->bytes;
    q->stats->rx_dropped += q->out->dropped;
    q->stats->rx_bad_header += q->out->bad_headers;
    q->stats->rx_offloaded += q->out->offloaded;
    q->stats->rx_offload_passed += q->out->passed;
    return vhu_notify(q, calls);
}

/* The syncs of a queue, once per ring layout (queue_sync.h): vhus_* over split rings, vhup_* over packed. */
#define QS_FN(name) vhus_##name
#define QS_RING struct vq_split
#define QS_ELEM struct vq_used_elem
#define QS_VQ(q) ((q)->vq)
#define QS_SCRATCH(q) ((q)->scratch)
#define QS_PENDING(vq, max) vq_pending(vq) /* avail->idx: one read */
#define QS_DEQUEUE(vq, mem, nm, hdr_len, first, space, refs, pending, out)                                     \
    ((refs) ? vq_dequeue_refs(vq, mem, nm, hdr_len, first, space, refs, pending, out)                          \
            : vq_dequeue(vq, mem, nm, hdr_len, first, space, pending, out))
#define QS_ENQUEUE vq_enqueue_refs
#define QS_PUBLISH vq_publish
#include "queue_sync.h"

#define QS_FN(name) vhup_##name
#define QS_RING struct vq_packed
#define QS_ELEM struct vqp_used_elem
#define QS_VQ(q) ((q)->packed)
#define QS_SCRATCH(q) ((q)->packed_scratch)
#define QS_PENDING vqp_pending_upto
#define QS_DEQUEUE vqp_dequeue_refs
#define QS_ENQUEUE vqp_enqueue_refs
#define QS_PUBLISH vqp_publish
#include "queue_sync.h"

int32_t vhu_rxsync(struct nm_kring *k, struct vq_split *vq, const struct vm_memory *mem, uint32_t hdr_len,
                   struct nm_stash *stash, struct vq_used_elem *pending, struct vq_batch *out)
{
    return vhus_rxsync_refs(k, vq, mem, hdr_len, stash, NULL, 0, pending, out);
}

int32_t vhu_txsync(struct nm_kring *k, struct vq_split *vq, const struct vm_memory *mem, uint32_t hdr_len,
                   int32_t mergeable, struct nm_stash *stash, struct vq_used_elem *pending,
                   struct vq_batch *out)
{
    return vhus_txsync_refs(k, vq, mem, hdr_len, mergeable, stash, NULL, pending, out);
}

/* A pass's round takes `burst` slots of small frames from a source, but of large ones about the bytes of
 * VHU_ROUND_FRAMES MTU frames (DPDK's bursts of 32), and never fewer than that many frames: what a round pays
 * once (a chain of misses on the guest's lines, a full fence) is best spread over many small frames (128 of
 * 64 bytes: 1.15x near, 1.24x far over 32, P3 through a link), while a round of 128 large ones kept their
 * used entries back too long (1500 bytes: 0.80x). Sized by the mean frame of the source's last batch. */
#define VHU_ROUND_FRAMES 32u
#define VHU_ROUND_BYTES (VHU_ROUND_FRAMES * (uint32_t)ETH_FRAME_LEN)

static inline uint32_t vhu_round_burst(uint32_t burst, uint32_t frame_len)
{
    if (!burst || !frame_len || burst <= VHU_ROUND_FRAMES)
        return burst;
    uint32_t fit = VHU_ROUND_BYTES / frame_len;
    return fit >= burst ? burst : fit > VHU_ROUND_FRAMES ? fit : VHU_ROUND_FRAMES;
}

/* The passes below take any mix of layouts: each sync of a queue picks its layout's instance, one test a
 * batch (never one a frame or a chain). */
static inline int32_t vhu_queue_rxsync_refs(struct vhu_queue *q, struct vq_refs *refs, uint32_t burst)
{
    uint32_t b = vhu_round_burst(burst, q->frame_len);
    int32_t status = q->packed ? vhup_queue_rxsync_refs(q, refs, b) : vhus_queue_rxsync_refs(q, refs, b);
    if (q->out->packets)
        q->frame_len = (uint32_t)(q->out->bytes / q->out->packets);
    return status;
}

static inline int32_t vhu_queue_publish(const struct vhu_queue *q, struct vq_refs *refs)
{
    return q->packed ? vhup_queue_publish(q, refs) : vhus_queue_publish(q, refs);
}

static inline int32_t vhu_queue_txsync_refs(const struct vhu_queue *q, const struct vq_refs *refs)
{
    return q->packed ? vhup_queue_txsync_refs(q, refs) : vhus_queue_txsync_refs(q, refs);
}

int32_t vhu_queue_rxsync(const struct vhu_queue *q)
{
    return q->packed ? vhup_queue_rxsync_refs(q, NULL, 0) : vhus_queue_rxsync_refs(q, NULL, 0);
}

/* The ring head its user wrote, or UINT32_MAX if outside the ring. */
static uint32_t vhu_user_head(const struct nm_kring *k)
{
    const uint32_t *word = (const uint32_t *)(const void *)(k->ring + NM_RING_HEAD);
    uint32_t head = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    return head < k->bufs.num_slots ? head : UINT32_MAX;
}

static uint32_t vhu_dist(uint32_t first, uint32_t last, uint32_t n)
{
    return last >= first ? last - first : last + n - first;
}

/* Settle what refers to guest memory among the received slots its user has not released ([head, hwtail)). */
static void vhu_settle_rx(const struct nm_kring *k, const struct vq_refs *refs)
{
    uint32_t head = vhu_user_head(k);
    if (head != UINT32_MAX && k->nr_hwtail < k->bufs.num_slots)
        vq_refs_settle(refs, &k->bufs, head, vhu_dist(head, k->nr_hwtail, k->bufs.num_slots));
}

/* Settle what refers to guest memory among the slots handed to a TX kring and not sent ([hwcur, head)). */
static void vhu_settle_tx(const struct nm_kring *k, const struct vq_refs *refs)
{
    uint32_t head = vhu_user_head(k);
    if (head != UINT32_MAX && k->nr_hwcur < k->bufs.num_slots)
        vq_refs_settle(refs, &k->bufs, k->nr_hwcur, vhu_dist(k->nr_hwcur, head, k->bufs.num_slots));
}

int32_t vhu_queue_txsync(const struct vhu_queue *q)
{
    return vhu_queue_txsync_refs(q, NULL);
}

/* One round of vhu_link_pass: every lane once. Returns the slots its sources took from their guests plus
 * those it moved into destinations: a source whose destination is full still makes progress while its own
 * ring has room (and its guest, having kicked once, may not kick again). The first alone are added to
 * *taken. */
static uint64_t vhu_link_round(struct vhu_lane *lanes, uint32_t nlanes, struct vq_refs *refs, uint32_t burst,
                               uint64_t *taken, int32_t *failed, int32_t *status)
{
    uint64_t moved = 0;
    for (uint32_t k = 0; k < nlanes; k++) {
        struct vhu_queue *src = &lanes[k].src;
        const struct vhu_queue *dst = &lanes[k].dst;
        int32_t st_src = VQ_OK, st_dst;
        int deferred = 0;
        if (src->kring) {
            st_src = vhu_queue_rxsync_refs(src, refs, burst);
            if (st_src != VQ_OK) {
                if (refs)
                    vq_refs_reset(refs); /* the slots it filled were not published */
                *failed = (int32_t)(2 * k);
                *status = st_src;
                return moved;
            }
            deferred = refs != NULL;
            moved += src->out->slots;
            *taken += src->out->slots;
        }
        /* The destination may be filled by another thread's lane too (VALE's rule, as one short section).
         * What it did not take is settled before the lock goes: another thread's sync of that ring must never
         * meet this pass's tickets. */
        vhu_lock(dst->lock);
        if (src->kring)
            moved += nm_swap_slots(src->kring, dst->kring, UINT32_MAX);
        st_dst = vhu_queue_txsync_refs(dst, deferred ? refs : NULL);
        if (deferred)
            vhu_settle_tx(dst->kring, refs);
        vhu_unlock(dst->lock);
        if (deferred) {
            /* Whatever the destination did not take (no receive buffers yet, or its fault) stays, in the
             * slots' own buffers, before the source may reuse its transmit buffers. */
            vhu_settle_rx(src->kring, refs);
            st_src = vhu_queue_publish(src, refs);
        }
        if (st_dst != VQ_OK || st_src != VQ_OK) {
            *failed = (int32_t)(st_dst != VQ_OK ? 2 * k + 1 : 2 * k);
            *status = st_dst != VQ_OK ? st_dst : st_src;
            return moved;
        }
    }
    return moved;
}

uint64_t vhu_link_pass(struct vhu_lane *lanes, uint32_t nlanes, struct vq_refs *refs, uint32_t burst,
                       uint32_t budget, int32_t *failed, int32_t *status)
{
    uint64_t moved = 0, taken = 0, now;
    *failed = -1;
    do {
        now = vhu_link_round(lanes, nlanes, refs, burst, &taken, failed, status);
        moved += now;
    } while (*failed < 0 && now && taken < budget);
    return moved;
}

uint64_t vhu_sink_pass(struct vhu_queue *queues, uint32_t nqueues, uint32_t burst, uint32_t budget,
                       int32_t *failed, int32_t *status)
{
    uint64_t frames = 0, now;
    *failed = -1;
    do {
        now = 0;
        for (uint32_t k = 0; k < nqueues; k++) {
            struct vhu_queue *q = &queues[k];
            int32_t st = vhu_queue_rxsync_refs(q, NULL, burst);
            if (st != VQ_OK) {
                *failed = (int32_t)k;
                *status = st;
                return frames + now;
            }
            uint32_t n = nm_release_received(q->kring, q->stash);
            q->stats->rx_dropped += n;
            q->stats->rx_unconnected += n;
            now += n;
        }
        frames += now;
    } while (now && frames < budget);
    return frames;
}

uint64_t vhu_source_pass(struct vhu_queue *queues, uint32_t nqueues, uint32_t rounds, int32_t *failed,
                         int32_t *status)
{
    uint64_t sent = 0;
    *failed = -1;
    for (uint32_t r = 0; r == 0 || r < rounds; r++) {
        uint64_t now = 0;
        for (uint32_t k = 0; k < nqueues; k++) {
            const struct vhu_queue *q = &queues[k];
            nm_hand_all(q->kring);
            int32_t st = vhu_queue_txsync(q);
            if (st != VQ_OK) {
                *failed = (int32_t)k;
                *status = st;
                return sent + now;
            }
            now += q->out->packets;
        }
        sent += now;
        if (!now)
            break;
    }
    return sent;
}

/* One round of vhu_switch_pass: every source once, then the TX queues left to flush. */
static uint64_t vhu_switch_round(struct sw_table *t, struct vhu_switch_source *sources, uint32_t nsources,
                                 struct vhu_queue *tx, uint32_t ntx, uint8_t *synced, struct vq_refs *refs,
                                 uint32_t burst, double now, int32_t *failed, int32_t *status)
{
    uint64_t received = 0;
    int32_t st;
    for (uint32_t k = 0; k < nsources; k++) {
        struct vhu_switch_source *s = &sources[k];
        int deferred = 0;
        if (s->rx.kring) {
            if ((st = vhu_queue_rxsync_refs(&s->rx, refs, burst)) != VQ_OK) {
                if (refs)
                    vq_refs_reset(refs); /* the slots it filled were not published */
                *failed = (int32_t)k;
                *status = st;
                return received;
            }
            deferred = refs != NULL;
        }
        s->fwd->refs = deferred ? refs : NULL;
        received += sw_forward(t, s->fwd, now);
        s->fwd->refs = NULL;
        /* Deliver at once: the next source finds the rings emptied as far as their guests take frames. What a
         * destination kept (no receive buffers, or a fault) is settled before its lock goes, so that another
         * thread's sync never meets this pass's tickets (a ring other threads fill got none: sw_forward). */
        int32_t fail_at = -1, fail_st = VQ_OK;
        for (uint32_t i = 0; i < s->fwd->ntouched; i++) {
            uint32_t d = s->dest_tx[s->fwd->touched[i]];
            vhu_lock(tx[d].lock);
            if (fail_at < 0) {
                if ((st = vhu_queue_txsync_refs(&tx[d], deferred ? refs : NULL)) != VQ_OK) {
                    fail_at = (int32_t)(nsources + d);
                    fail_st = st;
                } else {
                    synced[d] = 1;
                }
            }
            if (deferred)
                vhu_settle_tx(tx[d].kring, refs);
            vhu_unlock(tx[d].lock);
            if (fail_at >= 0 && !deferred)
                break;
        }
        if (deferred) {
            /* An unfinished run left in the source ring goes to the slots' own buffers too, before the source
             * may reuse its transmit buffers. */
            vhu_settle_rx(s->rx.kring, refs);
            if ((st = vhu_queue_publish(&s->rx, refs)) != VQ_OK && fail_at < 0) {
                fail_at = (int32_t)k;
                fail_st = st;
            }
        }
        if (fail_at >= 0) {
            *failed = fail_at;
            *status = fail_st;
            return received;
        }
    }
    for (uint32_t d = 0; d < ntx; d++) {
        const struct nm_kring *k = tx[d].kring;
        if (synced[d])
            continue;
        vhu_lock(tx[d].lock);
        st = k->rhead == k->nr_hwcur ? VQ_OK : vhu_queue_txsync(&tx[d]);
        vhu_unlock(tx[d].lock);
        if (st != VQ_OK) {
            *failed = (int32_t)(nsources + d);
            *status = st;
            return received;
        }
    }
    return received;
}

uint64_t vhu_switch_pass(struct sw_table *t, struct vhu_switch_source *sources, uint32_t nsources,
                         struct vhu_queue *tx, uint32_t ntx, const uint8_t *flush, uint8_t *synced,
                         struct vq_refs *refs, uint32_t burst, uint32_t budget, double now, int32_t *failed,
                         int32_t *status)
{
    uint64_t received = 0, now_received;
    *failed = -1;
    do {
        memcpy(synced, flush, ntx);
        now_received = vhu_switch_round(t, sources, nsources, tx, ntx, synced, refs, burst, now, failed, status);
        received += now_received;
    } while (*failed < 0 && now_received && received < budget);
    return received;
}
