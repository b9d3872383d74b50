/* Compiled kring prologue/finalize and the datapath's ring-user operations (see kring.cdef). */
#include <string.h>
#include <time.h>

#include "kernels.h"

static inline uint32_t ring_load(const struct nm_kring *k, uint32_t offset)
{
    return __atomic_load_n((const uint32_t *)(const void *)(k->ring + offset), __ATOMIC_ACQUIRE);
}

static inline void ring_store(const struct nm_kring *k, uint32_t offset, uint32_t value)
{
    __atomic_store_n((uint32_t *)(void *)(k->ring + offset), value, __ATOMIC_RELEASE);
}

/* nm_distance / nm_in_range of abi.py. */
static inline uint32_t nm_dist(uint32_t first, uint32_t last, uint32_t n)
{
    return last >= first ? last - first : last + n - first;
}

static inline int nm_in(uint32_t i, uint32_t first, uint32_t last, uint32_t n)
{
    return nm_dist(first, i, n) <= nm_dist(first, last, n);
}

int32_t nm_sync_prologue(struct nm_kring *k)
{
    return nm_user_prologue(k, ring_load(k, NM_RING_HEAD), ring_load(k, NM_RING_CUR), 1);
}

int32_t nm_user_prologue(struct nm_kring *k, uint32_t head, uint32_t cur, int32_t restore_tail)
{
    uint32_t n = k->bufs.num_slots;
    if (head >= n || cur >= n || k->nr_hwcur >= n || k->nr_hwtail >= n || k->rtail >= n || k->rhead >= n)
        return -1;
    /* TX: slots handed over but not sent cannot be taken back (head >= rhead); RX: head within what was
     * filled. */
    uint32_t lo = k->tx ? k->rhead : k->nr_hwcur, hi = k->tx ? k->rtail : k->nr_hwtail;
    if (!nm_in(head, lo, hi, n) || !nm_in(cur, head, hi, n))
        return -1;
    uint32_t count = nm_dist(k->nr_hwcur, head, n);
    uint32_t min_len = k->tx ? 1 : 0, max_len = k->tx ? k->bufs.buf_size : 0xFFFF;
    if (nm_slots_check(k->bufs.slots, n, k->nr_hwcur, count, k->bufs.nbufs, min_len, max_len) != -1)
        return -1;
    if (restore_tail && ring_load(k, NM_RING_TAIL) != k->rtail)
        ring_store(k, NM_RING_TAIL, k->rtail);
    k->rhead = head;
    k->rcur = cur;
    return 0;
}

int32_t nm_sync_finalize(struct nm_kring *k)
{
    if (k->nr_hwcur >= k->bufs.num_slots || k->nr_hwtail >= k->bufs.num_slots)
        return -1;
    k->rtail = k->nr_hwtail;
    ring_store(k, NM_RING_TAIL, k->rtail);
    return 0;
}

void nm_sync_timestamp(struct nm_kring *k)
{
    if (!(ring_load(k, NM_RING_FLAGS) & NR_TIMESTAMP))
        return;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    int64_t tv[2] = {(int64_t)now.tv_sec, (int64_t)now.tv_nsec / 1000};
    memcpy(k->ring + NM_RING_TS, tv, sizeof tv);
}

uint32_t nm_swap_slots(struct nm_kring *rx, struct nm_kring *tx, uint32_t limit)
{
    uint32_t rn = rx->bufs.num_slots, tn = tx->bufs.num_slots;
    uint32_t rh = ring_load(rx, NM_RING_HEAD), th = ring_load(tx, NM_RING_HEAD);
    if (rh >= rn || th >= tn)
        return 0;
    uint32_t n = nm_dist(rh, ring_load(rx, NM_RING_TAIL) % rn, rn);
    uint32_t room = nm_dist(th, ring_load(tx, NM_RING_TAIL) % tn, tn);
    if (room < n)
        n = room;
    if (limit < n)
        n = limit;
    uint32_t si = rh, di = th;
    for (uint32_t k = 0; k < n; k++) {
        struct nm_slot *s = &rx->bufs.slots[si], *d = &tx->bufs.slots[di];
        uint32_t spare = d->buf_idx;
        d->buf_idx = s->buf_idx;
        s->buf_idx = spare;
        d->len = s->len;
        /* A slot that refers to guest memory (one-copy passes: virtio.cdef) keeps referring; a frame that
         * carries its virtio-net header keeps it. */
        d->ptr = s->ptr;
        d->flags = (uint16_t)((s->flags & (NS_MOREFRAG | NS_INDIRECT | NS_VNET_HDR)) | NS_BUF_CHANGED);
        s->flags = NS_BUF_CHANGED;
        if (++si == rn)
            si = 0;
        if (++di == tn)
            di = 0;
    }
    if (n) {
        ring_store(rx, NM_RING_HEAD, si);
        ring_store(rx, NM_RING_CUR, si);
        ring_store(tx, NM_RING_HEAD, di);
        ring_store(tx, NM_RING_CUR, di);
    }
    return n;
}

/* The buffer index of `slot` if it may enter or leave the stash, else 0 (reserved: never a data buffer). */
static inline uint32_t nm_stash_idx(const struct nm_bufs *nm, const struct nm_slot *slot)
{
    uint32_t idx = __atomic_load_n(&slot->buf_idx, __ATOMIC_RELAXED);
    return idx >= NM_RESERVED_BUFS && idx < nm->nbufs ? idx : 0;
}

/* nm_stash_take (`take`: the cursor steps back to the newest buffer before each swap) and nm_stash_give (the
 * slot's buffer takes the oldest's place, then the cursor steps past it). */
static inline void nm_stash_swap(struct nm_stash *s, const struct nm_bufs *nm, uint32_t first, uint32_t count,
                                 int take)
{
    if (!s->size || first >= nm->num_slots)
        return;
    for (uint32_t k = 0, i = first; k < count; k++, i = i + 1 == nm->num_slots ? 0 : i + 1) {
        uint32_t idx = nm_stash_idx(nm, &nm->slots[i]);
        if (!idx)
            continue;
        if (take)
            s->cursor = s->cursor ? s->cursor - 1 : s->size - 1;
        nm->slots[i].buf_idx = s->bufs[s->cursor];
        s->bufs[s->cursor] = idx;
        if (!take)
            s->cursor = s->cursor + 1 == s->size ? 0 : s->cursor + 1;
    }
}

void nm_stash_take(struct nm_stash *s, const struct nm_bufs *nm, uint32_t first, uint32_t count)
{
    nm_stash_swap(s, nm, first, count, 1);
}

void nm_stash_give(struct nm_stash *s, const struct nm_bufs *nm, uint32_t first, uint32_t count)
{
    nm_stash_swap(s, nm, first, count, 0);
}

uint32_t nm_release_received(struct nm_kring *rx, struct nm_stash *stash)
{
    uint32_t n = rx->bufs.num_slots;
    uint32_t head = ring_load(rx, NM_RING_HEAD), tail = ring_load(rx, NM_RING_TAIL);
    if (head >= n || tail >= n)
        return 0;
    uint32_t frames = 0;
    for (uint32_t i = head; i != tail; i = i + 1 == n ? 0 : i + 1)
        frames += !(__atomic_load_n(&rx->bufs.slots[i].flags, __ATOMIC_RELAXED) & NS_MOREFRAG);
    if (stash)
        nm_stash_give(stash, &rx->bufs, head, nm_dist(head, tail, n));
    ring_store(rx, NM_RING_HEAD, tail);
    ring_store(rx, NM_RING_CUR, tail);
    return frames;
}

void nm_hand_all(struct nm_kring *tx)
{
    uint32_t tail = ring_load(tx, NM_RING_TAIL);
    ring_store(tx, NM_RING_HEAD, tail);
    ring_store(tx, NM_RING_CUR, tail);
}

uint32_t nm_copy_slots(const struct nm_bufs *src, uint32_t sfirst, const struct nm_bufs *dst, uint32_t dfirst,
                       uint32_t count, int32_t *bad)
{
    uint32_t sn = src->num_slots, dn = dst->num_slots;
    *bad = 0;
    if (sfirst >= sn || count > sn) {
        *bad = 1;
        return 0;
    }
    if (dfirst >= dn || count > dn) {
        *bad = 2;
        return 0;
    }
    uint32_t si = sfirst, di = dfirst, k;
    for (k = 0; k < count; k++) {
        struct nm_slot *s = &src->slots[si], *d = &dst->slots[di];
        /* Read once: the guest may rewrite its slots while we copy; what was checked is what is used. */
        uint32_t sb = __atomic_load_n(&s->buf_idx, __ATOMIC_RELAXED);
        uint16_t len = __atomic_load_n(&s->len, __ATOMIC_RELAXED);
        uint16_t flags = __atomic_load_n(&s->flags, __ATOMIC_RELAXED);
        uint32_t db = __atomic_load_n(&d->buf_idx, __ATOMIC_RELAXED);
        if (sb < NM_RESERVED_BUFS || sb >= src->nbufs || len > src->buf_size) {
            *bad = 1;
            break;
        }
        if (db < NM_RESERVED_BUFS || db >= dst->nbufs || len > dst->buf_size) {
            *bad = 2;
            break;
        }
        /* memmove: the two buffers are in different regions, unless a caller passed one ring twice. */
        memmove(dst->base + (size_t)db * dst->buf_size, src->base + (size_t)sb * src->buf_size, len);
        __atomic_store_n(&d->len, len, __ATOMIC_RELAXED);
        __atomic_store_n(&d->flags, (uint16_t)(flags & NS_MOREFRAG), __ATOMIC_RELAXED);
        if (++si == sn)
            si = 0;
        if (++di == dn)
            di = 0;
    }
    /* The copies are visible before whatever the caller publishes next (a tail, a CSB hwtail). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return k;
}
