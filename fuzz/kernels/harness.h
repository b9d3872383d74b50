/* Shared by the libFuzzer harnesses of the datapath kernels (the .c files beside it): a reader that decodes the
 * fuzz input into structured values, and builders for what the kernels take from untrusted hands (guest
 * memory regions, a split virtqueue, a netmap ring with its slots and buffers), in the spirit of rust-vmm's
 * virtio-queue fuzz target: the input describes the guest's memory and rings, not raw bytes only.
 *
 * Every object is its own heap block of exactly its size, so that AddressSanitizer reports any access past a
 * region, a ring or a buffer pool the kernels were told about. The harnesses include the project's C sources
 * (scripts/fuzz builds them), never copies of them. */
#ifndef VHOSTMAP_FUZZ_HARNESS_H
#define VHOSTMAP_FUZZ_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* A failed invariant is a crash libFuzzer keeps, with the reason on stderr. */
#define CHECK(cond)                                                                                          \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);                    \
            abort();                                                                                         \
        }                                                                                                    \
    } while (0)

/* --- decoding the input --------------------------------------------------------------------------------- */

struct reader {
    const uint8_t *p;
    size_t left;
};

static inline uint64_t rd_bytes_le(struct reader *r, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n && r->left; i++, r->p++, r->left--)
        v |= (uint64_t)*r->p << (8 * i);
    return v; /* an exhausted input reads as zeros: every input decodes to something */
}

static inline uint8_t rd_u8(struct reader *r) { return (uint8_t)rd_bytes_le(r, 1); }
static inline uint16_t rd_u16(struct reader *r) { return (uint16_t)rd_bytes_le(r, 2); }
static inline uint32_t rd_u32(struct reader *r) { return (uint32_t)rd_bytes_le(r, 4); }
static inline uint64_t rd_u64(struct reader *r) { return rd_bytes_le(r, 8); }

/* A value in [lo, hi]. */
static inline uint32_t rd_range(struct reader *r, uint32_t lo, uint32_t hi)
{
    uint32_t span = hi - lo + 1;
    uint32_t v = span <= 0x100 ? rd_u8(r) : span <= 0x10000 ? rd_u16(r) : rd_u32(r);
    return span ? lo + v % span : v;
}

static inline void rd_fill(struct reader *r, uint8_t *dst, size_t n)
{
    size_t k = n < r->left ? n : r->left;
    memcpy(dst, r->p, k);
    memset(dst + k, 0, n - k);
    r->p += k;
    r->left -= k;
}

/* --- guest memory ------------------------------------------------------------------------------------- */

#define FZ_MAX_REGIONS 4
#define FZ_MAX_REGION_SIZE 0x4000

struct fz_guest {
    struct vm_region regions[FZ_MAX_REGIONS];
    uint8_t *blocks[FZ_MAX_REGIONS];
    uint8_t *log;
    struct vm_memory mem;
};

/* 0..4 regions sorted by gpa and disjoint (what GuestMemory.table guarantees), each a separate heap block of
 * 1..16 KiB with input bytes in it, and sometimes a dirty log too short for them. */
static void fz_guest_build(struct fz_guest *g, struct reader *r)
{
    memset(g, 0, sizeof *g);
    uint32_t n = rd_range(r, 0, FZ_MAX_REGIONS);
    uint64_t gpa = (uint64_t)rd_range(r, 0, 3) << 12;
    if (rd_u8(r) == 0xFF)
        gpa = UINT64_MAX - FZ_MAX_REGIONS * 2 * FZ_MAX_REGION_SIZE; /* near the top of the address space */
    for (uint32_t i = 0; i < n; i++) {
        uint64_t size = rd_range(r, 1, FZ_MAX_REGION_SIZE);
        g->blocks[i] = malloc(size);
        rd_fill(r, g->blocks[i], size < 256 ? size : 256); /* ring contents come from the input elsewhere */
        if (size > 256)
            memset(g->blocks[i] + 256, 0xA5, size - 256);
        g->regions[i] = (struct vm_region){gpa, size, 0x7f0000000000ULL + gpa, (uint64_t)(uintptr_t)g->blocks[i]};
        gpa += size + rd_range(r, 0, 2) * 0x1000; /* adjacent or with a hole */
    }
    g->mem.regions = g->regions;
    g->mem.nregions = n;
    uint8_t log = rd_u8(r);
    if (log & 1) {
        g->mem.log_size = rd_range(r, 1, 8);
        g->log = calloc(1, g->mem.log_size);
        g->mem.log = g->log;
    }
}

static void fz_guest_free(struct fz_guest *g)
{
    for (uint32_t i = 0; i < FZ_MAX_REGIONS; i++)
        free(g->blocks[i]);
    free(g->log);
}

/* A guest-physical address the input chose: mostly inside (or straddling the end of) a region, sometimes any
 * 64-bit value. */
static uint64_t fz_gpa(const struct fz_guest *g, struct reader *r)
{
    uint8_t how = rd_u8(r);
    if (g->mem.nregions == 0 || how >= 0xF0)
        return rd_u64(r);
    const struct vm_region *reg = &g->regions[how % g->mem.nregions];
    return reg->gpa + rd_range(r, 0, (uint32_t)reg->size + 16);
}

/* --- a split virtqueue ---------------------------------------------------------------------------------- */

struct fz_vq {
    struct vq_split vq;
    uint8_t *desc, *avail, *used;
    struct vq_used_elem *pending;
};

/* A descriptor written by the driver: address and length mostly inside guest memory, flags and next as the
 * input says (NEXT, WRITE and INDIRECT in any combination, next possibly out of range). */
static void fz_desc(const struct fz_guest *g, struct reader *r, uint8_t *at, uint32_t num)
{
    uint64_t addr = fz_gpa(g, r);
    uint8_t lk = rd_u8(r);
    uint32_t len = lk < 0xC0 ? rd_range(r, 0, 300) : lk < 0xF0 ? rd_range(r, 0, 16) * 16 : rd_u32(r);
    uint16_t flags = rd_u8(r) & 0x0F;
    uint16_t next = rd_u8(r) < 0xF0 ? (uint16_t)rd_range(r, 0, num - 1) : rd_u16(r);
    memcpy(at, &addr, 8);
    memcpy(at + 8, &len, 4);
    memcpy(at + 12, &flags, 2);
    memcpy(at + 14, &next, 2);
}

/* The rings of a queue of 1..64 entries (a power of two), each in a block of exactly its spec size, filled
 * from the input; the device's indexes and negotiated features from the input too. Indirect tables are
 * written into guest regions (where vm_translate finds them). */
static void fz_vq_build(struct fz_vq *q, const struct fz_guest *g, struct reader *r)
{
    memset(q, 0, sizeof *q);
    uint32_t num = 1u << rd_range(r, 0, 6);
    q->desc = malloc(16 * num);
    q->avail = malloc(6 + 2 * num);
    q->used = malloc(6 + 8 * num);
    q->pending = malloc(sizeof *q->pending * num);
    for (uint32_t i = 0; i < num; i++)
        fz_desc(g, r, q->desc + 16 * i, num);
    /* Indirect tables: a few descriptors written at an address inside a region. */
    for (uint32_t t = rd_range(r, 0, 2); t && g->mem.nregions; t--) {
        const struct vm_region *reg = &g->regions[rd_u8(r) % g->mem.nregions];
        uint32_t entries = rd_range(r, 1, 8);
        if (reg->size < 16 * entries)
            continue;
        uint32_t off = rd_range(r, 0, (uint32_t)reg->size - 16 * entries);
        for (uint32_t i = 0; i < entries; i++)
            fz_desc(g, r, (uint8_t *)(uintptr_t)reg->host + off + 16 * i, entries);
    }
    uint16_t last_avail = rd_u16(r);
    uint16_t pending = rd_u8(r) < 0xE0 ? (uint16_t)rd_range(r, 0, num) : rd_u16(r);
    uint16_t avail_flags = rd_u8(r) & 1, used_event = rd_u16(r);
    memcpy(q->avail, &avail_flags, 2);
    uint16_t avail_idx = (uint16_t)(last_avail + pending);
    memcpy(q->avail + 2, &avail_idx, 2);
    for (uint32_t i = 0; i < num; i++) {
        uint16_t head = rd_u8(r) < 0xF8 ? (uint16_t)rd_range(r, 0, num - 1) : rd_u16(r);
        memcpy(q->avail + 4 + 2 * i, &head, 2);
    }
    memcpy(q->avail + 4 + 2 * num, &used_event, 2);
    rd_fill(r, q->used, 6 + 8 * num);
    uint8_t feat = rd_u8(r);
    q->vq = (struct vq_split){
        .desc = q->desc,
        .avail = q->avail,
        .used = q->used,
        .log_used_addr = fz_gpa(g, r),
        .num = num,
        .last_avail_idx = last_avail,
        .used_idx = rd_u16(r),
        .signalled_used = rd_u16(r),
        .event_idx = feat & 1,
        .indirect = (feat >> 1) & 1,
        .log_dirty = (feat >> 2) & 1,
        .log_used = (feat >> 3) & 1,
        .kicks = (feat >> 4) & 1,
        .host_offloads = (feat >> 5) & 1,
        /* Every offload kept with its header (NS_VNET_HDR), or none; taken by the receiving driver, or not. */
        .pass_offloads = (feat >> 6) & 1 ? 0xFF : 0,
        .guest_offloads = (feat >> 7) & 1 ? 0xFF : 0,
    };
}

static void fz_vq_free(struct fz_vq *q)
{
    free(q->desc);
    free(q->avail);
    free(q->used);
    free(q->pending);
}

/* --- a netmap ring ------------------------------------------------------------------------------------- */

struct fz_ring {
    struct nm_bufs nm;
};

/* 1..64 slots over a pool of 1..64 buffers of 16..2048 bytes; slot fields from the input (buffer indexes
 * mostly in the pool, sometimes reserved or beyond it; lengths mostly within a buffer). */
static void fz_ring_build(struct fz_ring *ring, struct reader *r)
{
    uint32_t num_slots = rd_range(r, 1, 64), nbufs = rd_range(r, 1, 64);
    static const uint32_t sizes[] = {16, 60, 64, 128, 1514, 2048};
    uint32_t buf_size = sizes[rd_u8(r) % (sizeof sizes / sizeof sizes[0])];
    ring->nm = (struct nm_bufs){
        .slots = calloc(num_slots, sizeof(struct nm_slot)),
        .num_slots = num_slots,
        .buf_size = buf_size,
        .base = malloc((size_t)nbufs * buf_size),
        .nbufs = nbufs,
    };
    memset(ring->nm.base, 0x5A, (size_t)nbufs * buf_size);
    for (uint32_t i = 0; i < num_slots; i++) {
        struct nm_slot *s = &ring->nm.slots[i];
        uint8_t how = rd_u8(r);
        s->buf_idx = how < 0xF0 ? rd_range(r, 0, nbufs - 1) : rd_u32(r);
        s->len = how & 1 ? rd_u16(r) : (uint16_t)rd_range(r, 0, buf_size);
        s->flags = rd_u8(r) & 0xBF; /* netmap's flags, NS_VNET_HDR among them */
    }
}

static void fz_ring_free(struct fz_ring *ring)
{
    free(ring->nm.slots);
    free(ring->nm.base);
}

#endif
