/* Helpers virtio.c defines for the other ring kernels (packed.c): not a .cdef, cffi needs none of it. */
#ifndef VHOSTMAP_VIRTIO_SHARED_H
#define VHOSTMAP_VIRTIO_SHARED_H

#include "kernels.h"

/* GuestMemory.log_write: mark guest-physical [gpa, gpa + len) dirty in mem's log; count the pages that missed
 * it in out->log_missed (and remember the first such range), for kernels.finish to warn about. */
void vq_log_write(const struct vm_memory *mem, uint64_t gpa, uint64_t len, struct vq_batch *out);

#endif
