/* The syncs of one queue of a port (struct vhu_queue) that the passes of vhost_sync.c run, written once for
 * both ring layouts. A template, not a header, as ring_batch.h is: vhost_sync.c includes it twice, once for
 * split rings and once for packed ones, after defining what the syncs need of the ring; the passes pick an
 * instance once per batch (vhu_queue.packed), so the split syncs are the code they were before.
 *
 * What the includer defines (and this file undefines at its end):
 *   QS_FN(name)          this instance's `name` (vhus_ for split rings, vhup_ for packed ones)
 *   QS_RING              the queue's C struct
 *   QS_ELEM              its used entries waiting to be published
 *   QS_VQ(q)             the ring of struct vhu_queue q
 *   QS_SCRATCH(q)        its used entries (QS_ELEM[num])
 *   QS_PENDING(vq, max)  the chains available, or at least `max` of them (how many slots the stash hands out
 *                        first)
 *   QS_DEQUEUE(vq, mem, nm, hdr_len, first, space, refs, pending, out)              refs may be NULL
 *   QS_ENQUEUE(vq, mem, nm, hdr_len, mergeable, first, count, refs, pending, out)    refs may be NULL
 *   QS_PUBLISH(vq, mem, pending, out)    the completion a dequeue with refs left
 * Layout-independent helpers (vhu_received, vhu_notify, the kring's prologue and finalize) are vhost_sync.c's,
 * defined before it. */

/* vhu_rxsync filling at most `burst` slots (0: all there is room for); with `refs`, into slots that refer to
 * the guest's buffers, nothing completed (the dequeue with refs). */
static int32_t QS_FN(rxsync_refs)(struct nm_kring *k, QS_RING *vq, const struct vm_memory *mem, uint32_t hdr_len,
                                  struct nm_stash *stash, struct vq_refs *refs, uint32_t burst, QS_ELEM *pending,
                                  struct vq_batch *out)
{
    if (nm_sync_prologue(k))
        return VHU_REJECT;
    uint32_t n = k->bufs.num_slots;
    k->nr_hwcur = k->rhead;
    /* Fill [hwtail, hwcur - 1): one slot always stays empty. */
    uint32_t room = (k->nr_hwcur + n - k->nr_hwtail - 1) % n;
    uint32_t space = burst && room > burst ? burst : room;
    if (stash && !refs) {
        /* A slot per waiting chain (a frame larger than a buffer takes more: those use their own). Not with
         * refs: then a slot refers to the guest's buffer and its own is not written (only a frame that cannot
         * be referred to is copied there), so a hot one is wasted, and the count (a packed ring's flags) and
         * the swaps cost 4-6 % of a one-copy pass at 64 bytes. */
        uint32_t take = QS_PENDING(vq, space);
        nm_stash_take(stash, &k->bufs, k->nr_hwtail, take < space ? take : space);
    }
    int32_t status = QS_DEQUEUE(vq, mem, &k->bufs, hdr_len, k->nr_hwtail, space, refs, pending, out);
    if (status == VQ_OK && out->held && !out->slots && !out->used && space < room) {
        /* The first chain needs more slots than a burst (a segmented 64 KiB frame): all the room there is,
         * or it would wait for ever. */
        status = QS_DEQUEUE(vq, mem, &k->bufs, hdr_len, k->nr_hwtail, room, refs, pending, out);
    }
    if (status == VQ_OK) {
        if (k->tap && out->slots)
            nm_tap_slots(k->tap, &k->bufs, k->nr_hwtail, out->slots, refs);
        k->nr_hwtail = (k->nr_hwtail + out->slots) % n;
    }
    nm_sync_finalize(k);
    if (status == VQ_OK)
        nm_sync_timestamp(k);
    return status;
}

/* vhu_txsync, delivering what slots of `refs` (may be NULL) refer to (the enqueue with refs). */
static int32_t QS_FN(txsync_refs)(struct nm_kring *k, QS_RING *vq, const struct vm_memory *mem, uint32_t hdr_len,
                                  int32_t mergeable, struct nm_stash *stash, const struct vq_refs *refs,
                                  QS_ELEM *pending, struct vq_batch *out)
{
    if (nm_sync_prologue(k))
        return VHU_REJECT;
    uint32_t n = k->bufs.num_slots;
    uint32_t count = (k->rhead + n - k->nr_hwcur) % n;
    int32_t status = VQ_OK;
    if (count) {
        status = QS_ENQUEUE(vq, mem, &k->bufs, hdr_len, mergeable, k->nr_hwcur, count, refs, pending, out);
        if (status == VQ_OK) {
            if (k->tap && out->slots)
                nm_tap_slots(k->tap, &k->bufs, k->nr_hwcur, out->slots, refs);
            /* Delivered slots were copied out: they are free again at once. A pass with refs leaves the stash
             * alone, as its rxsync does. */
            if (stash && !refs)
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

/* A sync's status for the pass: a fault of the guest's (a VQ_ERR_*) leaves the queue faulted (the ring's
 * faulted flag), so that no other pass touches what the fault left for the port to report. */
static int32_t QS_FN(queue_status)(const struct vhu_queue *q, int32_t status)
{
    if (status > VQ_OK)
        QS_VQ(q)->faulted = 1;
    return status;
}

/* The rxsync of a pass, at most `burst` slots (0: no limit): with `refs`, its slots refer to the guest's
 * buffers and its used entries wait in the queue's scratch for queue_publish (nothing counted or signalled
 * yet); without, as vhu_queue_rxsync. */
static int32_t QS_FN(queue_rxsync_refs)(const struct vhu_queue *q, struct vq_refs *refs, uint32_t burst)
{
    QS_RING *vq = QS_VQ(q);
    if (vq->faulted)
        return VHU_FAULTED;
    int32_t status = QS_FN(rxsync_refs)(q->kring, vq, q->mem, q->hdr_len, q->stash, refs, burst, QS_SCRATCH(q),
                                        q->out);
    if (refs || status != VQ_OK)
        return QS_FN(queue_status)(q, status);
    return vhu_received(q, &vq->calls);
}

/* After the frames of a queue_rxsync_refs were delivered or settled: publish the used entries, count,
 * interrupt; the tickets are void from now on. */
static int32_t QS_FN(queue_publish)(const struct vhu_queue *q, struct vq_refs *refs)
{
    QS_RING *vq = QS_VQ(q);
    vq_refs_reset(refs);
    int32_t status = QS_PUBLISH(vq, q->mem, QS_SCRATCH(q), q->out);
    return status == VQ_OK ? vhu_received(q, &vq->calls) : QS_FN(queue_status)(q, status);
}

static int32_t QS_FN(queue_txsync_refs)(const struct vhu_queue *q, const struct vq_refs *refs)
{
    QS_RING *vq = QS_VQ(q);
    if (vq->faulted)
        return VHU_FAULTED;
    int32_t status = QS_FN(queue_status)(q, QS_FN(txsync_refs)(q->kring, vq, q->mem, q->hdr_len, q->mergeable,
                                                               q->stash, refs, QS_SCRATCH(q), q->out));
    if (status == VQ_OK) {
        q->stats->tx_packets += q->out->packets;
        q->stats->tx_bytes += q->out->bytes;
        q->stats->tx_dropped += q->out->dropped;
        q->stats->tx_bad_header += q->out->bad_headers;
        q->stats->tx_offloaded += q->out->offloaded;
        status = vhu_notify(q, &vq->calls);
    }
    return status;
}

#undef QS_FN
#undef QS_RING
#undef QS_ELEM
#undef QS_VQ
#undef QS_SCRATCH
#undef QS_PENDING
#undef QS_DEQUEUE
#undef QS_ENQUEUE
#undef QS_PUBLISH
