/* The learning switch's per-frame work (netmap_vale.c: nm_bdg_preflush, the learning bridge lookup,
 * nm_bdg_flush), one batch of one source RX ring per call. The references are MacTable and
 * Switch._forward_reference in vhostmap/switch.py: this file does exactly what they do, in the same order
 * wherever the order can be seen (learning before lookups, addresses learnt in ascending order, destinations
 * filled frame by frame and stopped at the first frame that does not fit).
 *
 * Slots and buffers are in shared memory that a ring user may rewrite at any time: each slot field is read
 * once, every buffer index is checked against its pool and every length against the buffer size before a byte
 * is touched. The address table and the scratch arrays are private memory of the switch. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "refs.h"

#define SW_MAC_BITS 48
#define SW_MAC_MASK (((uint64_t)1 << SW_MAC_BITS) - 1)
/* The group bit: the lowest bit of the first byte, in an address read as a big-endian integer. */
#define SW_MULTICAST ((uint64_t)1 << 40)
#define SW_ETH_ALEN 6

/* Relaxed loads and stores of ring words: the compiler must read a shared field once and write it once. */
#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

/* --- the address table --------------------------------------------------------------------------------- */

static inline uint64_t entry_mac(const struct sw_entry *e)
{
    return e->key & SW_MAC_MASK;
}

static inline uint32_t entry_port(const struct sw_entry *e)
{
    return (uint32_t)(e->key >> SW_MAC_BITS);
}

/* Where the probe for `mac` starts: murmur3's 64-bit finaliser of the address keyed with the table's random
 * seed, so that a guest choosing its source addresses cannot pile them up on one probe chain. */
static inline uint32_t sw_home(const struct sw_table *t, uint64_t mac)
{
    uint64_t x = mac ^ t->seed;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (uint32_t)x & (t->capacity - 1);
}

/* The entry holding `mac`, or the free entry that ends its probe (there is one: count < capacity). */
static uint32_t sw_find(const struct sw_table *t, uint64_t mac)
{
    uint32_t mask = t->capacity - 1;
    uint32_t i = sw_home(t, mac);

    while (t->entries[i].key != 0 && entry_mac(&t->entries[i]) != mac)
        i = (i + 1) & mask;
    return i;
}

/* Free entry i. Linear probing has no tombstones: the entries after it in its cluster that may move back
 * (their home is not cyclically in (hole, j]) shift into the hole, so every probe still finds its entry.
 * Entries only move backwards into holes at or after i (cyclically). */
static void sw_remove_at(struct sw_table *t, uint32_t i)
{
    uint32_t mask = t->capacity - 1;
    uint32_t hole = i;

    for (uint32_t j = (i + 1) & mask; t->entries[j].key != 0; j = (j + 1) & mask) {
        uint32_t home = sw_home(t, entry_mac(&t->entries[j]));
        if (((j - home) & mask) >= ((j - hole) & mask)) {
            t->entries[hole] = t->entries[j];
            hole = j;
        }
    }
    t->entries[hole].key = 0;
    t->entries[hole].seen = 0;
    t->count--;
}

/* Whether the entry is stale at `now`, exactly as MacTable decides (now - seen > aging, in doubles). */
static inline int sw_stale(const struct sw_table *t, const struct sw_entry *e, double now)
{
    return now - e->seen > t->aging;
}

uint32_t sw_table_expire(struct sw_table *t, double now)
{
    uint32_t removed = 0;

    /* After a removal the same index is looked at again: an entry may have moved into it. An entry moved from
     * the start of the table (a cluster wrapping around) may be looked at twice, which is harmless. */
    for (uint32_t i = 0; i < t->capacity;) {
        if (t->entries[i].key != 0 && sw_stale(t, &t->entries[i], now)) {
            sw_remove_at(t, i);
            removed++;
        } else {
            i++;
        }
    }
    t->swept_at = now;
    return removed;
}

int sw_table_learn(struct sw_table *t, uint64_t mac, uint32_t port, double now)
{
    uint32_t i = sw_find(t, mac);

    if (t->entries[i].key == 0) {
        if (t->count >= t->max_entries) {
            /* Full: sweep the stale entries out first, as MacTable.learn does, unless a sweep at this very
             * time already did and nothing learnt since can be stale now (it would remove nothing). */
            if (!(now == t->swept_at))
                sw_table_expire(t, now);
            if (t->count >= t->max_entries) {
                t->not_learnt++;
                return 0;
            }
            i = sw_find(t, mac); /* the sweep moved entries */
        }
        t->count++;
    }
    t->entries[i].key = (mac & SW_MAC_MASK) | (uint64_t)port << SW_MAC_BITS;
    t->entries[i].seen = now;
    if (!(now == t->swept_at))
        t->swept_at = NAN;
    return 1;
}

int32_t sw_table_lookup(struct sw_table *t, uint64_t mac, double now)
{
    uint32_t i = sw_find(t, mac);
    const struct sw_entry *e = &t->entries[i];

    if (e->key == 0)
        return SW_FLOOD;
    if (sw_stale(t, e, now)) {
        sw_remove_at(t, i);
        return SW_FLOOD;
    }
    return (int32_t)entry_port(e);
}

uint32_t sw_table_remap(struct sw_table *t, const int32_t *map, uint32_t nmap)
{
    uint32_t removed = 0;

    /* Two passes: removals move entries around (see sw_table_expire), and an entry must be renumbered
     * once. */
    for (uint32_t i = 0; i < t->capacity;) {
        uint32_t p = entry_port(&t->entries[i]);
        if (t->entries[i].key != 0 && (p >= nmap || map[p] < 0)) {
            sw_remove_at(t, i);
            removed++;
        } else {
            i++;
        }
    }
    for (uint32_t i = 0; i < t->capacity; i++) {
        struct sw_entry *e = &t->entries[i];
        if (e->key != 0)
            e->key = entry_mac(e) | (uint64_t)(uint32_t)map[entry_port(e)] << SW_MAC_BITS;
    }
    return removed;
}

/* --- one batch ----------------------------------------------------------------------------------------- */

/* Up to this many distinct source addresses a batch keeps them sorted as they come (one or two senders are
 * the rule); past it they are sorted once at the end, so that a batch of many senders costs n log n. */
#define SW_FEW_SOURCES 4

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x, y;
    memcpy(&x, a, sizeof x);
    memcpy(&y, b, sizeof y);
    return (x > y) - (x < y);
}

/* The 48-bit address in the 6 bytes at p, in network order. */
static inline uint64_t mac_at(const uint8_t *p)
{
    uint32_t hi;
    uint16_t lo;
    memcpy(&hi, p, sizeof hi);
    memcpy(&lo, p + 4, sizeof lo);
    return (uint64_t)__builtin_bswap32(hi) << 16 | __builtin_bswap16(lo);
}

/* The distinct unicast source addresses of the batch so far: macs[0, n), ascending while `sorted`, else in
 * the order they came with consecutive repeats removed (sw_sources sorts them then). Returns the new n. */
static inline uint32_t sw_add_source(uint64_t *macs, uint32_t n, uint64_t mac, int *sorted)
{
    if (!*sorted) {
        if (macs[n - 1] != mac)
            macs[n++] = mac;
        return n;
    }
    uint32_t i = n;
    while (i > 0 && macs[i - 1] > mac)
        i--;
    if (i > 0 && macs[i - 1] == mac)
        return n;
    if (n == SW_FEW_SOURCES) {
        *sorted = 0;
        macs[n++] = mac;
        return n;
    }
    for (uint32_t j = n; j > i; j--)
        macs[j] = macs[j - 1];
    macs[i] = mac;
    return n + 1;
}

/* macs[0, n) ascending and distinct (sw_add_source's, finished); returns their number. */
static uint32_t sw_sources(uint64_t *macs, uint32_t n, int sorted)
{
    if (sorted || n < 2)
        return n;
    qsort(macs, n, sizeof macs[0], cmp_u64);
    uint32_t u = 1;
    for (uint32_t k = 1; k < n; k++)
        if (macs[k] != macs[u - 1])
            macs[u++] = macs[k];
    return u;
}

/* Frames [0, nframes) of the batch, delimited in s->frames: parse, learn, look up, deliver. `first` is the
 * ring index of the batch head. The counters are summed in locals and added once: the source's at the end,
 * a destination's before its lock goes. */
static void sw_batch(struct sw_table *t, struct sw_source *s, uint32_t nframes, uint32_t first, double now)
{
    const struct sw_ring *rx = &s->rx;
    struct sw_stats *st = s->ports[s->port].stats;
    uint32_t bs = s->buf_size, nbufs = rx->nbufs;
    /* The scratch arrays, private to the switch: no store through a ring pointer below changes them. */
    const struct sw_slot *snap = s->snap;
    struct sw_frame *frames = s->frames;
    uint32_t *dbufs = s->dbufs;
    /* Read once: a ring store or a frame's field may alias them as far as the compiler knows. */
    uint32_t nports = s->nports, port = s->port;

    /* Parse: a frame is valid when every slot has a usable buffer and length and its first slot holds a whole
     * Ethernet header (after the virtio-net header of a frame with NS_VNET_HDR); its addresses are read once
     * from that header. What is counted is the frame, without the virtio-net header. The distinct unicast
     * source addresses to learn are gathered meanwhile (private memory: no lock yet). */
    uint64_t rx_bytes = 0, dropped = 0;
    uint32_t nmacs = 0;
    int sorted = 1;
    for (uint32_t k = 0; k < nframes; k++) {
        struct sw_frame *f = &frames[k];
        const struct sw_slot *head = &snap[f->start];
        uint32_t at = head->flags & NS_VNET_HDR ? VIRTIO_NET_HDR_SIZE : 0;
        uint64_t bytes = 0;
        int valid = head->len >= at + SW_ETH_HLEN;
        for (uint32_t i = f->start; i < f->start + f->nslots; i++) {
            const struct sw_slot *sl = &snap[i];
            bytes += sl->len;
            valid &= sl->buf_idx >= NM_RESERVED_BUFS && sl->buf_idx < nbufs && sl->len >= 1 && sl->len <= bs;
        }
        f->bytes = bytes >= at ? bytes - at : 0;
        f->valid = (uint8_t)valid;
        f->vnet = at != 0;
        f->dest = SW_FLOOD;
        if (valid) {
            const uint8_t *data = head->ref != SW_NO_REF ? s->refs->refs[head->ref].host
                                                         : rx->bufs + (size_t)head->buf_idx * bs;
            f->dst = mac_at(data + at);
            f->src = mac_at(data + at + SW_ETH_ALEN);
            if (!(head->flags & NS_NO_LEARN) && f->src != 0 && !(f->src & SW_MULTICAST))
                nmacs = sw_add_source(s->macs, nmacs, f->src, &sorted);
        } else {
            f->dst = f->src = 0;
            dropped++;
        }
        rx_bytes += f->bytes;
    }

    /* The table is shared by every datapath thread running a source of this switch: learning and lookups
     * hold its lock (no ring lock is taken meanwhile). */
    vhu_lock(&t->lock);

    /* Learning, before any lookup: each distinct unicast source address of the batch once, in ascending order
     * (which addresses make it into a table that fills up depends on the order). */
    nmacs = sw_sources(s->macs, nmacs, sorted);
    for (uint32_t k = 0; k < nmacs; k++)
        sw_table_learn(t, s->macs[k], port, now);

    /* Lookups: group addresses flood, and so do unknown ones. Repeating a lookup changes nothing (a stale
     * entry is gone after the first, and the table changes no other way meanwhile), so the last two addresses
     * looked up answer again without one: the frames of two flows take turns in a batch. */
    uint64_t seen_dst[2] = {0, 0};
    int32_t seen_dest[2] = {SW_FLOOD, SW_FLOOD};
    uint32_t nseen = 0;
    uint64_t flooded = 0, filtered = 0, forwarded = 0;
    uint8_t want[nports];
    int flood = 0;
    memset(want, 0, nports);
    for (uint32_t k = 0; k < nframes; k++) {
        struct sw_frame *f = &frames[k];
        if (!f->valid)
            continue;
        int32_t dest = SW_FLOOD;
        if (!(f->dst & SW_MULTICAST)) {
            if (nseen > 0 && f->dst == seen_dst[0]) {
                dest = seen_dest[0];
            } else if (nseen > 1 && f->dst == seen_dst[1]) {
                dest = seen_dest[1];
            } else {
                dest = sw_table_lookup(t, f->dst, now);
                /* Cannot happen (the table is renumbered with the port list), but dest indexes memory
                 * below. */
                if (dest >= (int32_t)nports)
                    dest = SW_FLOOD;
                seen_dst[1] = seen_dst[0];
                seen_dest[1] = seen_dest[0];
                seen_dst[0] = f->dst;
                seen_dest[0] = dest;
                nseen = nseen < 2 ? nseen + 1 : 2;
            }
        }
        f->dest = dest;
        if (dest == SW_FLOOD) {
            flooded++;
            flood = 1;
        } else {
            want[dest] = 1;
            if ((uint32_t)dest == port)
                filtered++;
            else
                forwarded++;
        }
    }

    vhu_unlock(&t->lock);

    /* Delivery, destination by destination: each ring takes the frames offered to it in order, under its
     * lock (another thread's source may fill it too), from the snapshot of its head and tail taken then to
     * the head published before the lock goes. A frame goes into it whole or is dropped for it (counted at
     * both ends): a frame with its virtio-net header for a ring without (vnet), and from the first frame that
     * does not fit on, every frame. */
    const struct vq_refs *refs = s->refs;
    uint64_t ticket_gen = refs ? vq_ref_ticket(refs, 0) : 0;
    size_t bsz = bs;
    struct nm_slot *rx_slots = rx->slots;
    uint32_t rx_n = rx->num_slots;
    for (uint32_t d = 0; d < nports; d++) {
        if (d == port || !(flood || want[d]))
            continue;
        struct sw_ring *r = &s->ports[d];
        uint32_t dn = r->num_slots, dnbufs = r->nbufs;
        /* A unicast frame moves its buffers when both ports share an allocator (the source slots get d's
         * spare buffers); otherwise, or when flooded, its bytes are copied into d's spare buffers; a frame
         * that goes as tickets does neither. With two ports the flood has one destination, which takes it as
         * a unicast frame. */
        int same_mem = r->mem == rx->mem, lone = nports == 2;
        struct nm_slot *slots = r->slots;
        uint8_t *bufs = r->bufs;
        uint64_t tx_frames = 0, tx_bytes = 0, tx_dropped = 0;
        int touched = 0, full = 0;
        uint32_t dhead = 0, pos = 0, space = 0, taken = 0;
        vhu_lock(r->lock);
        /* Whether frames may go as tickets: a ring other datapath threads fill too gets none (its lock) */
        int refer = !r->lock, refuse_vnet = !r->vnet;
        for (uint32_t k = 0; k < nframes; k++) {
            const struct sw_frame *f = &frames[k];
            int unicast;
            if (!f->valid)
                continue;
            if (f->dest == SW_FLOOD)
                unicast = lone;
            else if ((uint32_t)f->dest == d)
                unicast = 1;
            else
                continue;
            if (f->vnet && refuse_vnet) {
                tx_dropped++;
                continue;
            }
            if (!touched) {
                uint32_t h = LOAD(r->head), tl = LOAD(r->tail);
                touched = 1;
                dhead = h;
                pos = h % dn;
                space = (tl % dn + dn - pos) % dn;
            }
            /* Room: each destination slot read once. A slot without a usable buffer (buffer 0 after a ring
             * reinit, or anything a user wrote there) ends the room of the ring, as tx_room does. */
            uint32_t ns = f->nslots;
            if (!full && ns <= space) {
                for (uint32_t k2 = 0, j = pos; k2 < ns; k2++) {
                    uint32_t b = LOAD(&slots[j].buf_idx);
                    if (b < NM_RESERVED_BUFS || b >= dnbufs) {
                        full = 1;
                        break;
                    }
                    dbufs[k2] = b;
                    if (++j == dn)
                        j = 0;
                }
            } else {
                full = 1;
            }
            if (full) {
                tx_dropped++;
                continue;
            }
            /* A frame that goes as tickets moves no buffers: its bytes stay in the source guest's memory, and
             * a swap would only trade buffers nobody reads (three stores a slot, a tenth of the pass). */
            int swap = unicast && same_mem && !(refer && snap[f->start].ref != SW_NO_REF);
            uint16_t changed = swap ? NS_BUF_CHANGED : 0;
            uint32_t j = pos;
            for (uint32_t k2 = 0; k2 < ns; k2++) {
                uint32_t rel = f->start + k2;
                const struct sw_slot *sl = &snap[rel];
                struct nm_slot *ds = &slots[j];
                uint16_t flags = (uint16_t)((sl->flags & (NS_MOREFRAG | NS_VNET_HDR)) | changed);
                if (swap) {
                    uint32_t si = first + rel;
                    if (si >= rx_n)
                        si -= rx_n;
                    STORE(&ds->buf_idx, sl->buf_idx);
                    STORE(&rx_slots[si].buf_idx, dbufs[k2]);
                    STORE(&rx_slots[si].flags, (uint16_t)NS_BUF_CHANGED);
                }
                if (sl->ref != SW_NO_REF && refer) {
                    /* Refers to the source guest's memory: the destination's enqueue copies from there (a
                     * flood: each destination's does), and its own buffer stays for vq_refs_settle. */
                    STORE(&ds->ptr, ticket_gen | sl->ref);
                    flags |= NS_INDIRECT;
                } else if (sl->ref != SW_NO_REF) {
                    /* A ring other datapath threads fill too: no ticket may outlive its lock (their syncs
                     * cannot read it), so the frame is copied into the buffer the slot gets now (the parse
                     * bounded len by the piece's). */
                    uint32_t b = swap ? sl->buf_idx : dbufs[k2];
                    memcpy(bufs + (size_t)b * bsz, refs->refs[sl->ref].host, sl->len);
                } else if (!swap) {
                    /* Both indexes were checked against their pools, len against buf_size (the parse).
                     * memmove: a hostile user may have named the same buffer on both sides. */
                    memmove(bufs + dbufs[k2] * bsz, rx->bufs + sl->buf_idx * bsz, sl->len);
                }
                STORE(&ds->len, sl->len);
                STORE(&ds->flags, flags);
                if (++j == dn)
                    j = 0;
            }
            pos = j;
            space -= ns;
            taken += ns;
            tx_frames++;
            tx_bytes += f->bytes;
        }
        if (taken) {
            /* Release: the filled slots must be visible to whoever sees the new head. */
            uint32_t h = (uint32_t)(((uint64_t)dhead + taken) % dn);
            __atomic_store_n(r->head, h, __ATOMIC_RELEASE);
            __atomic_store_n(r->cur, h, __ATOMIC_RELEASE);
        }
        r->stats->tx_frames += tx_frames;
        r->stats->tx_bytes += tx_bytes;
        r->stats->tx_dropped += tx_dropped;
        vhu_unlock(r->lock);
        dropped += tx_dropped;
        if (touched)
            s->touched[s->ntouched++] = d;
    }

    st->rx_frames += nframes;
    st->rx_bytes += rx_bytes;
    st->forwarded += forwarded;
    st->flooded += flooded;
    st->filtered += filtered;
    st->dropped += dropped;
}

uint32_t sw_forward(struct sw_table *t, struct sw_source *s, double now)
{
    const struct sw_ring *rx = &s->rx;
    uint32_t n = rx->num_slots;
    uint32_t head = LOAD(rx->head), tail = LOAD(rx->tail);

    s->ntouched = 0;
    if (head == tail)
        return 0;
    /* As the reference computes them, with head and tail taken modulo the ring size. */
    uint32_t first = head % n;
    uint32_t count = (tail % n + n - first) % n;

    /* The snapshot: every slot of the batch read once, and its frames delimited meanwhile (runs of
     * NS_MOREFRAG slots ended by one without it). The Ethernet header of each buffer is fetched into the
     * cache too: parsing reads it next, and a buffer another thread filled is rarely in ours. */
    const struct vq_refs *refs = s->refs;
    uint16_t keep = rx->vnet ? 0xFFFF : (uint16_t)~NS_VNET_HDR; /* a port whose frames never carry the header */
    uint32_t nframes = 0, used = 0;
    for (uint32_t i = 0, j = first; i < count; i++) {
        const struct nm_slot *sl = &rx->slots[j];
        struct sw_slot *sn = &s->snap[i];
        uint32_t b = LOAD(&sl->buf_idx);
        uint16_t len = LOAD(&sl->len);
        uint16_t flags = LOAD(&sl->flags) & keep;
        const struct vq_ref *ref = flags & NS_INDIRECT ? vq_ref_at(refs, LOAD(&sl->ptr)) : NULL;
        sn->buf_idx = b;
        sn->flags = flags;
        if (ref) {
            sn->ref = (uint32_t)(ref - refs->refs);
            sn->len = len > ref->len ? (uint16_t)ref->len : len;
            __builtin_prefetch(ref->host);
        } else {
            sn->ref = SW_NO_REF;
            sn->len = len;
            if (b < rx->nbufs)
                __builtin_prefetch(rx->bufs + (size_t)b * s->buf_size);
        }
        if (!(flags & NS_MOREFRAG)) {
            s->frames[nframes].start = used;
            s->frames[nframes].nslots = i + 1 - used;
            nframes++;
            used = i + 1;
        }
        if (++j == n)
            j = 0;
    }

    /* An unfinished run at the end stays in the ring for the next batch, unless it fills the whole ring and
     * so can never end: then all is dropped. */
    if (nframes == 0 && count == n - 1) {
        s->ports[s->port].stats->dropped++;
        used = count;
    } else if (nframes) {
        sw_batch(t, s, nframes, first, now);
    }

    uint32_t h = (uint32_t)(((uint64_t)head + used) % n);
    __atomic_store_n(rx->head, h, __ATOMIC_RELEASE);
    __atomic_store_n(rx->cur, h, __ATOMIC_RELEASE);
    return used;
}
