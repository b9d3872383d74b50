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

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x, y;
    memcpy(&x, a, sizeof x);
    memcpy(&y, b, sizeof y);
    return (x > y) - (x < y);
}

/* A 48-bit address from its 6 bytes in network order. */
static inline uint64_t mac_from(const uint8_t *p)
{
    uint64_t m = 0;
    for (int i = 0; i < SW_ETH_ALEN; i++)
        m = m << 8 | p[i];
    return m;
}

/* Whether frame f fits whole in port d's TX ring after the frames this batch already put there; if so, the
 * spare buffers of the slots it would take are in s->dbufs. Once a frame did not fit, none after it does. */
static int sw_room(struct sw_source *s, const struct sw_frame *f, uint32_t d)
{
    const struct sw_ring *r = &s->ports[d];
    struct sw_dest *st = &s->dests[d];
    uint32_t dn = r->num_slots;

    if (!st->touched) {
        uint32_t head = LOAD(r->head), tail = LOAD(r->tail);
        st->touched = 1;
        st->full = 0;
        st->head = head;
        st->pos = head % dn;
        st->space = (tail % dn + dn - st->pos) % dn;
        st->taken = 0;
    }
    if (st->full || f->nslots > st->space)
        return 0;
    /* Each slot read once. A slot without a usable buffer (buffer 0 after a ring reinit, or anything a user
     * wrote there) ends the room of the ring, as tx_room does. */
    for (uint32_t k = 0, j = st->pos; k < f->nslots; k++) {
        uint32_t b = LOAD(&r->slots[j].buf_idx);
        if (b < NM_RESERVED_BUFS || b >= r->nbufs)
            return 0;
        s->dbufs[k] = b;
        if (++j == dn)
            j = 0;
    }
    return 1;
}

/* Offer frame f to port d: it goes into d's TX ring whole, or it is dropped for d (counted at both ends).
 * `unicast`: d is its only destination, so its buffers move when both ports share an allocator (the source
 * slots get d's spare buffers); otherwise its bytes are copied into d's spare buffers. `rx_first` is the ring
 * index of the batch head. */
static void sw_deliver(struct sw_source *s, const struct sw_frame *f, uint32_t d, int unicast,
                       uint32_t rx_first)
{
    struct sw_ring *r = &s->ports[d];
    struct sw_dest *st = &s->dests[d];

    if ((s->snap[f->start].flags & NS_VNET_HDR) && !r->vnet) {
        r->stats->tx_dropped++;
        s->ports[s->port].stats->dropped++;
        return;
    }
    if (!sw_room(s, f, d)) {
        st->full = 1;
        r->stats->tx_dropped++;
        s->ports[s->port].stats->dropped++;
        return;
    }
    const struct sw_ring *rx = &s->rx;
    size_t bs = s->buf_size;
    int swap = unicast && r->mem == rx->mem;
    uint32_t j = st->pos;
    for (uint32_t k = 0; k < f->nslots; k++) {
        uint32_t rel = f->start + k;
        const struct sw_slot *sl = &s->snap[rel];
        struct nm_slot *ds = &r->slots[j];
        uint16_t flags = (uint16_t)((sl->flags & (NS_MOREFRAG | NS_VNET_HDR)) | (swap ? NS_BUF_CHANGED : 0));
        if (swap) {
            uint32_t si = rx_first + rel;
            if (si >= rx->num_slots)
                si -= rx->num_slots;
            STORE(&ds->buf_idx, sl->buf_idx);
            STORE(&rx->slots[si].buf_idx, s->dbufs[k]);
            STORE(&rx->slots[si].flags, (uint16_t)NS_BUF_CHANGED);
        }
        if (sl->ref != SW_NO_REF && !r->lock) {
            /* Refers to the source guest's memory: the destination's enqueue copies from there (a flood: each
             * destination's does), and its own buffer stays for vq_refs_settle. */
            STORE(&ds->ptr, vq_ref_ticket(s->refs, sl->ref));
            flags |= NS_INDIRECT;
        } else if (sl->ref != SW_NO_REF) {
            /* A ring other datapath threads fill too: no ticket may outlive its lock (their syncs cannot read
             * it), so the frame is copied into the buffer the slot gets now (sw_batch bounded len by the
             * piece's). */
            uint32_t b = swap ? sl->buf_idx : s->dbufs[k];
            memcpy(r->bufs + (size_t)b * bs, s->refs->refs[sl->ref].host, sl->len);
        } else if (!swap) {
            /* Both indexes were checked against their pools, len against buf_size (sw_batch). memmove: a
             * hostile user may have named the same buffer on both sides. */
            memmove(r->bufs + s->dbufs[k] * bs, rx->bufs + sl->buf_idx * bs, sl->len);
        }
        STORE(&ds->len, sl->len);
        STORE(&ds->flags, flags);
        if (++j == r->num_slots)
            j = 0;
    }
    st->pos = j;
    st->space -= f->nslots;
    st->taken += f->nslots;
    r->stats->tx_frames++;
    r->stats->tx_bytes += f->bytes;
}

/* Frames [0, nframes) of the batch, delimited in s->frames: parse, learn, look up, deliver. `first` is the
 * ring index of the batch head. */
static void sw_batch(struct sw_table *t, struct sw_source *s, uint32_t nframes, uint32_t first, double now)
{
    const struct sw_ring *rx = &s->rx;
    struct sw_stats *st = s->ports[s->port].stats;
    uint32_t bs = s->buf_size;

    /* Parse: a frame is valid when every slot has a usable buffer and length and its first slot holds a whole
     * Ethernet header (after the virtio-net header of a frame with NS_VNET_HDR); its addresses are read once
     * from that header. What is counted is the frame, without the virtio-net header. */
    uint64_t rx_bytes = 0, invalid = 0;
    for (uint32_t k = 0; k < nframes; k++) {
        struct sw_frame *f = &s->frames[k];
        const struct sw_slot *head = &s->snap[f->start];
        uint32_t at = head->flags & NS_VNET_HDR ? VIRTIO_NET_HDR_SIZE : 0;
        uint64_t bytes = 0;
        int valid = head->len >= at + SW_ETH_HLEN;
        for (uint32_t i = f->start; i < f->start + f->nslots; i++) {
            const struct sw_slot *sl = &s->snap[i];
            bytes += sl->len;
            if (sl->buf_idx < NM_RESERVED_BUFS || sl->buf_idx >= rx->nbufs || sl->len < 1 || sl->len > bs)
                valid = 0;
        }
        f->bytes = bytes >= at ? bytes - at : 0;
        f->valid = (uint8_t)valid;
        f->no_learn = (head->flags & NS_NO_LEARN) != 0;
        f->dest = SW_FLOOD;
        if (valid) {
            uint8_t hdr[2 * SW_ETH_ALEN];
            const uint8_t *data = head->ref != SW_NO_REF ? s->refs->refs[head->ref].host
                                                         : rx->bufs + (size_t)head->buf_idx * bs;
            memcpy(hdr, data + at, sizeof hdr);
            f->dst = mac_from(hdr);
            f->src = mac_from(hdr + SW_ETH_ALEN);
        } else {
            f->dst = f->src = 0;
            invalid++;
        }
        rx_bytes += f->bytes;
    }
    st->rx_frames += nframes;
    st->rx_bytes += rx_bytes;
    st->dropped += invalid;

    /* The table is shared by every datapath thread running a source of this switch: learning and lookups
     * hold its lock (no ring lock is taken meanwhile). */
    vhu_lock(&t->lock);

    /* Learning, before any lookup: each distinct unicast source address of the batch once, in ascending order
     * (which addresses make it into a table that fills up depends on the order). */
    uint32_t nmacs = 0;
    for (uint32_t k = 0; k < nframes; k++) {
        const struct sw_frame *f = &s->frames[k];
        if (!f->valid || f->no_learn || f->src == 0 || (f->src & SW_MULTICAST))
            continue;
        if (nmacs == 0 || s->macs[nmacs - 1] != f->src)
            s->macs[nmacs++] = f->src;
    }
    if (nmacs > 1) {
        qsort(s->macs, nmacs, sizeof s->macs[0], cmp_u64);
        uint32_t u = 1;
        for (uint32_t k = 1; k < nmacs; k++)
            if (s->macs[k] != s->macs[u - 1])
                s->macs[u++] = s->macs[k];
        nmacs = u;
    }
    for (uint32_t k = 0; k < nmacs; k++)
        sw_table_learn(t, s->macs[k], s->port, now);

    /* Lookups: group addresses flood, and so do unknown ones. Repeating a lookup changes nothing (a stale
     * entry is gone after the first), so consecutive frames to one address share one. */
    uint64_t last_dst = 0;
    int32_t last_dest = SW_FLOOD;
    int have_last = 0;
    for (uint32_t k = 0; k < nframes; k++) {
        struct sw_frame *f = &s->frames[k];
        if (!f->valid)
            continue;
        if (f->dst & SW_MULTICAST) {
            f->dest = SW_FLOOD;
        } else {
            if (!have_last || f->dst != last_dst) {
                last_dst = f->dst;
                last_dest = sw_table_lookup(t, f->dst, now);
                /* Cannot happen (the table is renumbered with the port list), but dest indexes memory
                 * below. */
                if (last_dest >= (int32_t)s->nports)
                    last_dest = SW_FLOOD;
                have_last = 1;
            }
            f->dest = last_dest;
        }
        if (f->dest == SW_FLOOD)
            st->flooded++;
        else if ((uint32_t)f->dest == s->port)
            st->filtered++;
        else
            st->forwarded++;
    }

    vhu_unlock(&t->lock);

    /* Delivery, destination by destination: each ring takes the frames offered to it in order, under its
     * lock (another thread's source may fill it too), from the snapshot of its head and tail taken then to
     * the head published before the lock goes. */
    uint8_t want[s->nports];
    int flood = 0;
    memset(want, 0, s->nports);
    for (uint32_t k = 0; k < nframes; k++) {
        const struct sw_frame *f = &s->frames[k];
        if (f->valid && f->dest == SW_FLOOD)
            flood = 1;
        else if (f->valid)
            want[f->dest] = 1;
    }
    for (uint32_t d = 0; d < s->nports; d++) {
        struct sw_dest *ds = &s->dests[d];
        ds->touched = 0;
        if (d == s->port || !(flood || want[d]))
            continue;
        struct sw_ring *r = &s->ports[d];
        vhu_lock(r->lock);
        for (uint32_t k = 0; k < nframes; k++) {
            const struct sw_frame *f = &s->frames[k];
            /* With two ports the flood has one destination, which takes it as a unicast frame. */
            if (f->valid && f->dest == SW_FLOOD)
                sw_deliver(s, f, d, s->nports == 2, first);
            else if (f->valid && (uint32_t)f->dest == d)
                sw_deliver(s, f, d, 1, first);
        }
        if (ds->taken) {
            /* Release: the filled slots must be visible to whoever sees the new head. */
            uint32_t h = (uint32_t)(((uint64_t)ds->head + ds->taken) % r->num_slots);
            __atomic_store_n(r->head, h, __ATOMIC_RELEASE);
            __atomic_store_n(r->cur, h, __ATOMIC_RELEASE);
        }
        vhu_unlock(r->lock);
        if (ds->touched)
            s->touched[s->ntouched++] = d;
    }
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

    /* The snapshot: every slot of the batch read once. The Ethernet header of each buffer is fetched into
     * the cache meanwhile: parsing reads it next, and a buffer another thread filled is rarely in ours. */
    for (uint32_t i = 0, j = first; i < count; i++) {
        const struct nm_slot *sl = &rx->slots[j];
        struct sw_slot *sn = &s->snap[i];
        uint32_t b = LOAD(&sl->buf_idx);
        sn->buf_idx = b;
        sn->len = LOAD(&sl->len);
        sn->flags = LOAD(&sl->flags);
        if (!rx->vnet)
            sn->flags &= (uint16_t)~NS_VNET_HDR; /* a port whose frames never carry the header */
        const struct vq_ref *ref = sn->flags & NS_INDIRECT ? vq_ref_at(s->refs, LOAD(&sl->ptr)) : NULL;
        if (ref) {
            sn->ref = (uint32_t)(ref - s->refs->refs);
            if (sn->len > ref->len)
                sn->len = (uint16_t)ref->len;
            __builtin_prefetch(ref->host);
        } else {
            sn->ref = SW_NO_REF;
            if (b < rx->nbufs)
                __builtin_prefetch(rx->bufs + (size_t)b * s->buf_size);
        }
        if (++j == n)
            j = 0;
    }

    /* Frames: runs of NS_MOREFRAG slots ended by one without it. An unfinished run at the end stays in the
     * ring for the next batch, unless it fills the whole ring and so can never end: then all is dropped. */
    uint32_t nframes = 0, used = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (s->snap[i].flags & NS_MOREFRAG)
            continue;
        s->frames[nframes].start = used;
        s->frames[nframes].nslots = i + 1 - used;
        nframes++;
        used = i + 1;
    }
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
