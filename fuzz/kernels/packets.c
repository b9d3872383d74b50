/* libFuzzer harness of the kernels that read frames a peer wrote, beside the virtqueue walks: FUZZ_MODE 0 a
 * capture tap (datapath/capture.c) staging and publishing the frames of a ring whose slots are anything, into
 * a capture ring whose reader-written tail is anything; 1 completing offloads (datapath/offload.c) on a frame
 * and a virtio-net header from the input, mostly a well-formed TCP or UDP super-frame with some bytes
 * changed. */
#include "harness.h"

#ifndef FUZZ_MODE
#error "FUZZ_MODE must be defined"
#endif

#if FUZZ_MODE == 0

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = {data, size};
    struct fz_ring ring;
    fz_ring_build(&ring, &r);
    uint32_t cap_size = 1u << rd_range(&r, 4, 14), n = ring.nm.num_slots;
    /* The capture ring as the reader maps it: header, then the records; its own heap block. */
    uint8_t *shared = malloc(NM_CAP_HEADER + cap_size);
    memset(shared, 0, NM_CAP_HEADER + cap_size);
    uint64_t *ends = calloc(n, sizeof *ends);
    uint32_t *slot_ends = calloc(n, sizeof *slot_ends);
    struct nm_tap tap = {
        .ring = (struct nm_cap_ring *)(void *)shared,
        .data = shared + NM_CAP_HEADER,
        .size = cap_size,
        .snaplen = rd_range(&r, 1, 70000),
        .ends = ends,
        .slot_ends = slot_ends,
        .cap = n,
    };
    uint64_t start = rd_u64(&r) & ~(uint64_t)(NM_CAP_ALIGN - 1);
    tap.head = tap.published = start;
    for (int round = 0; round < 8 && r.left; round++) {
        tap.ring->tail = rd_u8(&r) < 0xE0 ? tap.published - rd_range(&r, 0, cap_size) : rd_u64(&r);
        uint32_t first = rd_u8(&r) < 0xF0 ? rd_range(&r, 0, n - 1) : rd_u32(&r);
        uint32_t count = rd_u8(&r) < 0xF0 ? rd_range(&r, 0, n) : rd_u32(&r);
        uint64_t before = tap.published, frames = tap.frames, dropped = tap.dropped;
        uint32_t staged = nm_tap_stage(&tap, &ring.nm, first, count, NULL, round);
        CHECK(staged <= n);
        uint32_t committed = nm_tap_commit(&tap, rd_range(&r, 0, n + 1));
        CHECK(committed <= staged);
        CHECK(tap.frames + tap.dropped == frames + dropped + committed);
        CHECK(tap.published - before <= cap_size); /* never more than the ring holds */
        CHECK(tap.head == tap.published);
        /* The slots change under the tap between syncs, as a ring user's would. */
        for (uint32_t k = rd_range(&r, 0, 4); k; k--) {
            struct nm_slot *s = &ring.nm.slots[rd_range(&r, 0, n - 1)];
            s->len = rd_u16(&r);
            s->flags = rd_u8(&r);
            s->buf_idx = rd_u32(&r);
        }
    }
    free(ends);
    free(slot_ends);
    free(shared);
    fz_ring_free(&ring);
    return 0;
}

#elif FUZZ_MODE == 1

/* A TCP or UDP frame over IPv4 or IPv6 (maybe VLAN-tagged) with `payload` bytes, for the mutations to bend. */
static uint32_t fz_super_frame(uint8_t *f, struct reader *r, uint32_t payload)
{
    uint32_t at = 12;
    if (rd_u8(r) & 1) {
        f[at++] = 0x81, f[at++] = 0x00, at += 2;
    }
    int v6 = rd_u8(r) & 1, tcp = rd_u8(r) & 1;
    f[at++] = v6 ? 0x86 : 0x08, f[at++] = v6 ? 0xDD : 0x00;
    if (v6) {
        f[at] = 0x60, f[at + 6] = tcp ? 6 : 17;
        at += 40;
    } else {
        f[at] = 0x45, f[at + 9] = tcp ? 6 : 17;
        at += 20;
    }
    if (tcp)
        f[at + 12] = 0x50, f[at + 13] = 0x19;
    return at + (tcp ? 20 : 8) + payload;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = {data, size};
    uint32_t len;
    uint8_t *frame;
    if (rd_u8(&r) < 0xC0) {
        uint8_t scratch[128] = {0};
        uint32_t payload = rd_range(&r, 0, 9000);
        len = fz_super_frame(scratch, &r, 0);
        uint32_t hlen = len;
        len += payload;
        frame = malloc(len ? len : 1); /* exactly the frame: ASan sees any read past it */
        memcpy(frame, scratch, hlen);
        rd_fill(&r, frame + hlen, payload);
        for (uint32_t k = rd_range(&r, 0, 4); k && len; k--)
            frame[rd_range(&r, 0, len - 1)] = rd_u8(&r);
        len -= rd_u8(&r) < 0x20 ? rd_range(&r, 0, len) : 0; /* cut short */
    } else {
        len = rd_range(&r, 0, 256);
        frame = malloc(len ? len : 1);
        rd_fill(&r, frame, len);
    }
    struct nm_vnet_hdr h = {
        .flags = rd_u8(&r),
        .gso_type = rd_u8(&r),
        .hdr_len = rd_u16(&r),
        .gso_size = rd_u8(&r) < 0xE0 ? (uint16_t)rd_range(&r, 1, 9000) : rd_u16(&r),
        .csum_start = rd_u8(&r) < 0xE0 ? (uint16_t)rd_range(&r, 0, 80) : rd_u16(&r),
        .csum_offset = rd_u8(&r) < 0xE0 ? (uint16_t)rd_range(&r, 0, 20) : rd_u16(&r),
    };
    uint32_t cap = rd_u8(&r) < 0xE0 ? 1u << 17 : rd_range(&r, 0, 20000);
    uint32_t max_segs = rd_u8(&r) < 0xE0 ? 256 : rd_range(&r, 0, 8);
    uint8_t *out = malloc(cap ? cap : 1);
    uint32_t *lens = calloc(max_segs ? max_segs : 1, sizeof *lens), n = 0;
    int32_t status = nm_offload_complete(&h, frame, len, out, cap, lens, max_segs, &n);
    CHECK(status <= NM_OFF_OK && status >= NM_OFF_NO_ROOM);
    uint64_t total = 0;
    for (uint32_t k = 0; k < n; k++)
        total += lens[k];
    CHECK(status == NM_OFF_OK ? n >= 1 && n <= max_segs && total <= cap : n == 0);
    free(out);
    free(lens);
    free(frame);
    return 0;
}

#endif
