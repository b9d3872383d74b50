/* The lookup of a ticket of struct vq_refs (virtio.cdef), shared by the kernels that read a slot's data:
 * virtio.c (enqueue, settle) and switch.c (sw_forward). Not a .cdef: cffi needs none of it. */
#ifndef VHOSTMAP_REFS_H
#define VHOSTMAP_REFS_H

#include "kernels.h"

#define VQ_REF_INDEX_MASK (VQ_REF_MAX - 1)

static inline uint64_t vq_ref_ticket(const struct vq_refs *refs, uint32_t index)
{
    return refs->gen << VQ_REF_BITS | index;
}

/* The entry a slot's ticket (slot.ptr, read once by the caller) names, or NULL when it names none of this
 * generation: then the slot's own buffer holds its data. */
static inline const struct vq_ref *vq_ref_at(const struct vq_refs *refs, uint64_t ticket)
{
    uint32_t index = (uint32_t)(ticket & VQ_REF_INDEX_MASK);
    if (!refs || ticket >> VQ_REF_BITS != refs->gen || index >= refs->count)
        return NULL;
    return &refs->refs[index];
}

#endif
