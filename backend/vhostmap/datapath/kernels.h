/* Declarations of the vhostmap datapath kernels. Each family of kernels declares its structs and functions in
 * a .cdef file (plain C declarations that cffi can parse too) and defines them in a .c file; the .cdef files
 * are listed here once, in dependency order, and build.py feeds the same list to cffi. */
#ifndef VHOSTMAP_KERNELS_H
#define VHOSTMAP_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "netmap.cdef"
#include "memory.cdef"
#include "guard.cdef"
#include "locks.cdef"
#include "virtio.cdef"
#include "packed.cdef"
#include "switch.cdef"
#include "kring.cdef"
#include "capture.cdef"
#include "offload.cdef"
#include "eventfd.cdef"
#include "vhost_sync.cdef"
#include "passthrough.cdef"
#include "cpuprobe.cdef"
#include "buildinfo.cdef"

#endif
