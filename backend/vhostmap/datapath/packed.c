/* Packed virtqueues (virtio 1.x spec 2.8): the device side of the ring, compiled, one operation per call (the
 * batch kernels over a packed ring, vqp_dequeue / vqp_enqueue, are virtio.c's, from ring_batch.h).
 *
 * The twin of PackedVirtqueue in vhostmap/vhost_user/packed.py (pending, pop, unpop, flush_used, call's
 * decision, enable_kicks), which is the reference: tests/unit/test_packed_differential.py drives both over the
 * same rings and compares every byte, position, id in flight and fault.
 *
 * The ring itself is read and written by packed_ring.h, which virtio.c shares.
 */
#include "packed_ring.h"

uint32_t vqp_pending(const struct vq_packed *vq)
{
    return pvq_pending(vq);
}

uint32_t vqp_pending_upto(const struct vq_packed *vq, uint32_t max)
{
    return pvq_pending_upto(vq, max);
}

int32_t vqp_pop(struct vq_packed *vq, const struct vm_memory *mem, int32_t writable, struct vq_seg *segs,
                uint32_t cap, struct vqp_chain *chain, struct vq_batch *out)
{
    if (!vq->desc || !vq->inflight || !vq->num || vq->num > 32768 || vq->last_avail_idx >= vq->num)
        return pvq_fail(out, VQ_ERR_ARGUMENT, 0, 0);
    return pvq_pop(vq, mem, writable, segs, cap, chain, out);
}

void vqp_unpop(struct vq_packed *vq, const struct vqp_chain *chain)
{
    pvq_unpop(vq, chain);
}

void vqp_complete(struct vq_packed *vq, const struct vm_memory *mem, const struct vqp_used_elem *pending,
                  uint32_t n, struct vq_batch *out)
{
    pvq_complete(vq, mem, pending, n, out);
}
