/* A vhost-user port's kring syncs in one call each (see vhost_sync.cdef). */
#include <string.h>

#include "kernels.h"

int32_t vhu_rxsync(struct nm_kring *k, struct vq_split *vq, const struct vm_memory *mem, uint32_t hdr_len,
                   struct vq_used_elem *pending, struct vq_batch *out)
{
    if (nm_sync_prologue(k))
        return VHU_REJECT;
    uint32_t n = k->bufs.num_slots;
    k->nr_hwcur = k->rhead;
    /* Fill [hwtail, hwcur - 1): one slot always stays empty. */
    uint32_t space = (k->nr_hwcur + n - k->nr_hwtail - 1) % n;
    int32_t status = vq_dequeue(vq, mem, &k->bufs, hdr_len, k->nr_hwtail, space, pending, out);
    if (status == VQ_OK)
        k->nr_hwtail = (k->nr_hwtail + out->slots) % n;
    nm_sync_finalize(k);
    if (status == VQ_OK)
        nm_sync_timestamp(k);
    return status;
}

int32_t vhu_txsync(struct nm_kring *k, struct vq_split *vq, const struct vm_memory *mem, uint32_t hdr_len,
                   int32_t mergeable, struct vq_used_elem *pending, struct vq_batch *out)
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
