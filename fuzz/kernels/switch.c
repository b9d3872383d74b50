/* libFuzzer harness of the learning switch (datapath/switch.c): sw_forward rounds over 2..4 ports whose RX
 * and TX rings (slots, head/cur/tail words, buffers) come from the input, some sharing an allocator (buffers
 * move between them) and some not (bytes are copied), with an address table of any size and age. Invariants:
 * the sanitizers', the released slots within the batch, ring words inside their rings, and no buffer of an
 * allocator lost or duplicated by the swaps. */
#include <math.h>

#include "harness.h"

#define MAX_PORTS 4
#define BUF_SIZE 64
#define NBUFS 48

struct port {
    struct sw_ring rx, tx;
    uint32_t words[2][3]; /* head, cur, tail of rx and tx */
    struct sw_stats stats;
};

static void ring_build(struct sw_ring *ring, uint32_t *words, struct reader *r, uint8_t **pools, uint32_t mem,
                       struct sw_stats *stats)
{
    uint32_t n = rd_range(r, 1, 16);
    ring->slots = calloc(n, sizeof *ring->slots);
    ring->num_slots = n;
    ring->nbufs = NBUFS;
    ring->bufs = pools[mem];
    ring->mem = mem;
    ring->stats = stats;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t how = rd_u8(r);
        ring->slots[i].buf_idx = how < 0xF0 ? rd_range(r, 0, NBUFS - 1) : rd_u32(r);
        ring->slots[i].len = how & 1 ? rd_u16(r) : (uint16_t)rd_range(r, 0, BUF_SIZE);
        ring->slots[i].flags = rd_u8(r) & (NS_MOREFRAG | NS_NO_LEARN | NS_BUF_CHANGED);
    }
    /* head = cur, tail: mostly inside the ring, sometimes beyond (a user may write anything). */
    words[0] = words[1] = rd_u8(r) < 0xF0 ? rd_range(r, 0, n - 1) : rd_u32(r);
    words[2] = rd_u8(r) < 0xF0 ? rd_range(r, 0, n - 1) : rd_u32(r);
    ring->head = &words[0];
    ring->cur = &words[1];
    ring->tail = &words[2];
}

static void count_bufs(const struct sw_ring *ring, uint32_t *counts, int sign)
{
    for (uint32_t i = 0; i < ring->num_slots; i++)
        if (ring->slots[i].buf_idx >= NM_RESERVED_BUFS && ring->slots[i].buf_idx < ring->nbufs)
            counts[ring->mem * NBUFS + ring->slots[i].buf_idx] += (uint32_t)sign;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = {data, size};
    uint32_t nports = rd_range(&r, 2, MAX_PORTS);
    uint8_t *pools[MAX_PORTS];
    for (uint32_t m = 0; m < MAX_PORTS; m++) {
        pools[m] = malloc(NBUFS * BUF_SIZE);
        rd_fill(&r, pools[m], 64);
        memset(pools[m] + 64, 0x33, NBUFS * BUF_SIZE - 64);
    }
    /* Frames need addresses: the first 12 bytes of a few buffers come from the input. */
    for (uint32_t k = rd_range(&r, 0, 12); k; k--)
        rd_fill(&r, pools[rd_u8(&r) % MAX_PORTS] + rd_range(&r, 0, NBUFS - 1) * BUF_SIZE, 12);
    static struct port ports[MAX_PORTS];
    struct sw_ring txs[MAX_PORTS];
    memset(ports, 0, sizeof ports);
    for (uint32_t p = 0; p < nports; p++) {
        uint32_t mem = rd_u8(&r) & 1 ? 0 : p; /* most ports share allocator 0 */
        ring_build(&ports[p].rx, ports[p].words[0], &r, pools, mem, &ports[p].stats);
        ring_build(&ports[p].tx, ports[p].words[1], &r, pools, mem, &ports[p].stats);
        txs[p] = ports[p].tx;
    }

    uint32_t capacity = 1u << rd_range(&r, 1, 5);
    struct sw_table t = {
        .entries = calloc(capacity, sizeof(struct sw_entry)),
        .capacity = capacity,
        .max_entries = rd_range(&r, 1, capacity - 1),
        .seed = rd_u64(&r),
        .aging = (double)rd_range(&r, 0, 300),
        .swept_at = NAN,
    };

    uint32_t *counts = calloc(MAX_PORTS * NBUFS, sizeof *counts);
    for (uint32_t p = 0; p < nports; p++) {
        count_bufs(&ports[p].rx, counts, 1);
        count_bufs(&ports[p].tx, counts, 1);
    }
    double now = 0;
    for (uint32_t round = rd_range(&r, 1, 4); round; round--) {
        uint32_t src = rd_range(&r, 0, nports - 1);
        struct sw_ring *rx = &ports[src].rx;
        uint32_t n = rx->num_slots;
        struct sw_source s = {
            .rx = *rx,
            .ports = txs,
            .nports = nports,
            .port = src,
            .buf_size = BUF_SIZE,
            .snap = calloc(n, sizeof(struct sw_slot)),
            .frames = calloc(n, sizeof(struct sw_frame)),
            .macs = calloc(n, sizeof(uint64_t)),
            .dbufs = calloc(n, sizeof(uint32_t)),
            .touched = calloc(nports, sizeof(uint32_t)),
        };
        uint32_t head = *rx->head, tail = *rx->tail;
        uint32_t tx_heads[MAX_PORTS];
        for (uint32_t d = 0; d < nports; d++)
            tx_heads[d] = *txs[d].head;
        uint32_t released = sw_forward(&t, &s, now);
        CHECK(released <= (tail % n + n - head % n) % n);
        /* head == tail: an empty batch, the words are left as the user wrote them. */
        CHECK(head == tail || (*rx->head < n && *rx->head == *rx->cur));
        CHECK(s.ntouched <= nports);
        for (uint32_t k = 0; k < s.ntouched; k++) {
            CHECK(s.touched[k] < nports && s.touched[k] != src);
            uint32_t d = s.touched[k];
            /* A destination that took frames gets a head inside its ring; one that took none is untouched. */
            CHECK(*txs[d].head == tx_heads[d] || (*txs[d].head < txs[d].num_slots && *txs[d].head == *txs[d].cur));
        }
        CHECK(t.count <= t.max_entries);
        free(s.snap);
        free(s.frames);
        free(s.macs);
        free(s.dbufs);
        free(s.touched);
        /* Time passes (entries age); the users hand back their TX slots and post more frames. */
        now += rd_range(&r, 0, 400);
        uint32_t d = rd_range(&r, 0, nports - 1);
        *txs[d].head = *txs[d].cur = *txs[d].tail;
        *rx->tail = rd_u8(&r) < 0xF0 ? rd_range(&r, 0, n - 1) : rd_u32(&r);
    }
    for (uint32_t p = 0; p < nports; p++) {
        count_bufs(&ports[p].rx, counts, -1);
        count_bufs(&ports[p].tx, counts, -1);
    }
    for (uint32_t b = 0; b < MAX_PORTS * NBUFS; b++)
        CHECK(counts[b] == 0); /* a swap moves buffers between rings of one allocator, never loses one */
    uint32_t live = 0;
    for (uint32_t i = 0; i < capacity; i++)
        live += t.entries[i].key != 0;
    CHECK(live == t.count);

    free(counts);
    free(t.entries);
    for (uint32_t p = 0; p < nports; p++) {
        free(ports[p].rx.slots);
        free(ports[p].tx.slots);
    }
    for (uint32_t m = 0; m < MAX_PORTS; m++)
        free(pools[m]);
    return 0;
}
