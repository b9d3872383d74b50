/* A vhost-user port's kring syncs in one call each (see vhost_sync.cdef). */
#include <string.h>

#include "kernels.h"

int32_t vhu_rxsync(struct nm_kring *k, struct vq_split *vq, const struct vm_memory *mem, uint32_t hdr_len,
                   struct nm_stash *stash, struct vq_used_elem *pending, struct vq_batch *out)
{
    if (nm_sync_prologue(k))
        return VHU_REJECT;
    uint32_t n = k->bufs.num_slots;
    k->nr_hwcur = k->rhead;
    /* Fill [hwtail, hwcur - 1): one slot always stays empty. */
    uint32_t space = (k->nr_hwcur + n - k->nr_hwtail - 1) % n;
    if (stash) {
        /* A slot per waiting chain (a frame larger than a buffer takes more: those use their own). */
        uint32_t take = vq_pending(vq);
        nm_stash_take(stash, &k->bufs, k->nr_hwtail, take < space ? take : space);
    }
    int32_t status = vq_dequeue(vq, mem, &k->bufs, hdr_len, k->nr_hwtail, space, pending, out);
    if (status == VQ_OK)
        k->nr_hwtail = (k->nr_hwtail + out->slots) % n;
    nm_sync_finalize(k);
    if (status == VQ_OK)
        nm_sync_timestamp(k);
    return status;
}

int32_t vhu_txsync(struct nm_kring *k, struct vq_split *vq, const struct vm_memory *mem, uint32_t hdr_len,
                   int32_t mergeable, struct nm_stash *stash, struct vq_used_elem *pending,
                   struct vq_batch *out)
{
    if (nm_sync_prologue(k))
        return VHU_REJECT;
    uint32_t n = k->bufs.num_slots;
    uint32_t count = (k->rhead + n - k->nr_hwcur) % n;
    int32_t status = VQ_OK;
    if (count) {
        status = vq_enqueue(vq, mem, &k->bufs, hdr_len, mergeable, k->nr_hwcur, count, pending, out);
        if (status == VQ_OK) {
            /* Delivered slots were copied out: they are free again at once. */
            if (stash)
                nm_stash_give(stash, &k->bufs, k->nr_hwcur, out->slots);
            k->nr_hwcur = (k->nr_hwcur + out->slots) % n;
            k->nr_hwtail = (k->nr_hwcur + n - 1) % n;
        }
    } else {
        memset(out, 0, sizeof *out);
        out->bad_slot = -1;
    }
    nm_sync_finalize(k);
    return status;
}

/* The interrupt the driver asked for (kernels.finish does the same for the calls above): VQ_OK, or the
 * VHU_EVENTFD_* status of a call eventfd that refused it (the sync itself is done and counted). */
static int32_t vhu_notify(const struct vhu_queue *q)
{
    if (q->out->notify && q->call_fd >= 0)
        return vhu_eventfd_signal(q->call_fd);
    return VQ_OK;
}

int32_t vhu_queue_rxsync(const struct vhu_queue *q)
{
    int32_t status = vhu_rxsync(q->kring, q->vq, q->mem, q->hdr_len, q->stash, q->scratch, q->out);
    if (status == VQ_OK) {
        q->stats->rx_packets += q->out->packets;
        q->stats->rx_bytes += q->out->bytes;
        q->stats->rx_dropped += q->out->dropped;
        status = vhu_notify(q);
    }
    return status;
}

int32_t vhu_queue_txsync(const struct vhu_queue *q)
{
    int32_t status =
        vhu_txsync(q->kring, q->vq, q->mem, q->hdr_len, q->mergeable, q->stash, q->scratch, q->out);
    if (status == VQ_OK) {
        q->stats->tx_packets += q->out->packets;
        q->stats->tx_bytes += q->out->bytes;
        q->stats->tx_dropped += q->out->dropped;
        status = vhu_notify(q);
    }
    return status;
}

uint64_t vhu_link_pass(struct vhu_lane *lanes, uint32_t nlanes, int32_t *failed, int32_t *status)
{
    uint64_t moved = 0;
    *failed = -1;
    for (uint32_t k = 0; k < nlanes; k++) {
        const struct vhu_queue *src = &lanes[k].src, *dst = &lanes[k].dst;
        int32_t st;
        if (src->kring) {
            st = vhu_queue_rxsync(src);
            if (st != VQ_OK) {
                *failed = (int32_t)(2 * k);
                *status = st;
                return moved;
            }
        }
        /* The destination may be filled by another thread's lane too (VALE's rule, as one short section). */
        vhu_lock(dst->lock);
        if (src->kring)
            moved += nm_swap_slots(src->kring, dst->kring, UINT32_MAX);
        st = vhu_queue_txsync(dst);
        vhu_unlock(dst->lock);
        if (st != VQ_OK) {
            *failed = (int32_t)(2 * k + 1);
            *status = st;
            return moved;
        }
    }
    return moved;
}

uint64_t vhu_sink_pass(struct vhu_queue *queues, uint32_t nqueues, int32_t *failed, int32_t *status)
{
    uint64_t frames = 0;
    *failed = -1;
    for (uint32_t k = 0; k < nqueues; k++) {
        const struct vhu_queue *q = &queues[k];
        int32_t st = vhu_queue_rxsync(q);
        if (st != VQ_OK) {
            *failed = (int32_t)k;
            *status = st;
            return frames;
        }
        uint32_t n = nm_release_received(q->kring, q->stash);
        q->stats->rx_dropped += n;
        frames += n;
    }
    return frames;
}

uint64_t vhu_source_pass(struct vhu_queue *queues, uint32_t nqueues, int32_t *failed, int32_t *status)
{
    uint64_t sent = 0;
    *failed = -1;
    for (uint32_t k = 0; k < nqueues; k++) {
        const struct vhu_queue *q = &queues[k];
        nm_hand_all(q->kring);
        int32_t st = vhu_queue_txsync(q);
        if (st != VQ_OK) {
            *failed = (int32_t)k;
            *status = st;
            return sent;
        }
        sent += q->out->packets;
    }
    return sent;
}

uint64_t vhu_switch_pass(struct sw_table *t, struct vhu_switch_source *sources, uint32_t nsources,
                         struct vhu_queue *tx, uint32_t ntx, uint8_t *synced, double now, int32_t *failed,
                         int32_t *status)
{
    uint64_t received = 0;
    int32_t st;
    *failed = -1;
    for (uint32_t k = 0; k < nsources; k++) {
        const struct vhu_switch_source *s = &sources[k];
        if (s->rx.kring && (st = vhu_queue_rxsync(&s->rx)) != VQ_OK) {
            *failed = (int32_t)k;
            *status = st;
            return received;
        }
        received += sw_forward(t, s->fwd, now);
        /* Deliver at once: the next source finds the rings emptied as far as their guests take frames. */
        for (uint32_t i = 0; i < s->fwd->ntouched; i++) {
            uint32_t d = s->dest_tx[s->fwd->touched[i]];
            vhu_lock(tx[d].lock);
            st = vhu_queue_txsync(&tx[d]);
            vhu_unlock(tx[d].lock);
            if (st != VQ_OK) {
                *failed = (int32_t)(nsources + d);
                *status = st;
                return received;
            }
            synced[d] = 1;
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
