/* Where a slot's data is: its buffer, or the piece of guest memory a ticket of struct vq_refs (virtio.cdef)
 * names; shared by the kernels that read slots: virtio.c (enqueue, settle), switch.c (sw_forward) and
 * capture.c. Not a .cdef: cffi needs none of it. */
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

/* The buffer of `slot`, its buf_idx read once. An index out of range means buffer 0, the scratch buffer, as
 * netmap's NMB() does: the kring checks the slots it takes, but the ring user may rewrite one after that, and
 * then only its own frame suffers. */
static inline uint8_t *nm_slot_buf(const struct nm_bufs *nm, const struct nm_slot *slot)
{
    uint32_t buf_idx = __atomic_load_n(&slot->buf_idx, __ATOMIC_RELAXED);
    if (buf_idx >= nm->nbufs)
        buf_idx = 0;
    return nm->base + (size_t)buf_idx * nm->buf_size;
}

/* Where the data of `slot` is (*data) and how many bytes (returned): the guest memory its ticket of `refs`
 * (may be NULL) names when it has NS_INDIRECT, else its buffer; len and flags read once. A len above what is
 * there (buf_size, or the piece referred to) was rewritten after the kring checked it: the buffer's counts
 * nothing, a piece of guest memory counts what the walk found. */
static inline uint32_t nm_slot_data(const struct nm_bufs *nm, const struct nm_slot *slot,
                                    const struct vq_refs *refs, const uint8_t **data)
{
    uint16_t len = __atomic_load_n(&slot->len, __ATOMIC_RELAXED);
    const struct vq_ref *ref = NULL;
    if (refs && (__atomic_load_n(&slot->flags, __ATOMIC_RELAXED) & NS_INDIRECT))
        ref = vq_ref_at(refs, __atomic_load_n(&slot->ptr, __ATOMIC_RELAXED));
    if (ref) {
        *data = ref->host;
        return len <= ref->len ? len : ref->len;
    }
    *data = nm_slot_buf(nm, slot);
    return len <= nm->buf_size ? len : 0;
}

#endif
