/* Helpers virtio.c defines for the other ring kernels (packed.c): not a .cdef, cffi needs none of it. */
#ifndef VHOSTMAP_VIRTIO_SHARED_H
#define VHOSTMAP_VIRTIO_SHARED_H

#include "kernels.h"

/* GuestMemory.log_write: mark guest-physical [gpa, gpa + len) dirty in mem's log; count the pages that missed
 * it in out->log_missed (and remember the first such range), for kernels.finish to warn about. */
void vq_log_write(const struct vm_memory *mem, uint64_t gpa, uint64_t len, struct vq_batch *out);

/* vm_translate, and in *region the region the range lies in (left as it was on a fault). */
uint8_t *vm_translate_region(const struct vm_memory *mem, uint64_t gpa, uint64_t len, struct vm_fault *fault,
                             const struct vm_region **region);

/* What vm_translate returns for [gpa, gpa + len) when its bisection would find `r` (a region of `mem` that
 * vm_translate_region gave for another range) and the range lies in it: r starts at or below gpa, the next
 * region (the table is sorted by start: GuestMemory) starts above it, and the range ends inside r and at 2^64
 * at most. NULL when any of that is not so: then vm_translate decides, fault and all. Ranges a driver put
 * side by side (a batch of descriptors) lie in one region, found once instead of a bisection each. */
static inline uint8_t *vm_translate_near(const struct vm_memory *mem, const struct vm_region *r, uint64_t gpa,
                                         uint64_t len)
{
    if (gpa < r->gpa || (gpa != 0 && len > UINT64_MAX - gpa + 1))
        return NULL;
    uint64_t offset = gpa - r->gpa;
    if (offset >= r->size || len > r->size - offset)
        return NULL;
    if (r + 1 < mem->regions + mem->nregions && r[1].gpa <= gpa)
        return NULL;
    return (uint8_t *)(uintptr_t)(r->host + offset);
}

/* vm_translate for one of several ranges a driver put side by side (a batch's descriptors): the region of
 * the range before (*region, NULL for the first) is tried first, and *region is where this one lies. */
static inline uint8_t *vm_translate_next(const struct vm_memory *mem, const struct vm_region **region,
                                         uint64_t gpa, uint64_t len, struct vm_fault *fault)
{
    uint8_t *host = *region ? vm_translate_near(mem, *region, gpa, len) : NULL;
    return host ? host : vm_translate_region(mem, gpa, len, fault, region);
}

#endif
