/* The batch kernels, written once for both ring layouts: rxtx.dequeue / rxtx.enqueue over a ring, then its
 * completion (flush_used, call's decision, enable_kicks). A template, not a header: virtio.c includes it twice,
 * once for split rings and once for packed ones, each time after defining what the batch logic needs of the
 * ring. The compiler sees each ring's operations as the plain static inline functions they are, so the split
 * kernels are the code they were before (no indirect call, no layout test per chain).
 *
 * What the includer defines (and this file undefines at its end):
 *   RB_FN(name)      the name of this instance's `name` (vq_put for split rings, vqp_put for packed ones)
 *   RB_RING          the queue's C struct
 *   RB_ELEM          a used entry waiting to be published: .id, .len (the batch keeps a chain's segment count
 *                    in .len until it writes the chain)
 *   RB_CHAIN         what a pop returns: .len, .nseg (VQ_NOT_STORED when more than fit) and the head
 *   RB_MARK          a position in the available chains, to give back what was taken since (and walk again)
 *   RB_HEAD(c)       the head a used entry and a fault name (split: the head descriptor; packed: the buffer id)
 *   RB_USED(c, len)  the used entry of chain c
 *   RB_ARGS_OK(vq, nm, first, count)              ring and slots the caller passed make sense
 *   RB_PENDING(vq, &n, out)                       chains available (VQ_OK), or the driver's fault
 *   RB_REFILL(vq, &n)                             when the count ran out: count again (0: nothing more)
 *   RB_POP(vq, mem, writable, segs, cap, &c, out) take the next chain, validated
 *   RB_UNPOP(vq, &c)                              give back chain c, the last taken
 *   RB_MARK_AT(vq)                                the position now
 *   RB_REWIND(vq, mark, elems, n)                 give back the n chains taken since mark (their entries elems)
 *   RB_REWALK(vq, mem, &at, elem, segs, &nseg, out)  walk again the chain of elem, taken at `at`
 *   RB_NEXT(vq, &at, elem)                        `at` past the chain of elem
 *   RB_COMPLETE(vq, mem, pending, n, out)         publish, decide the interrupt, re-arm kicks
 *   RB_BATCH                                      chains RB_POP_BATCH takes at most (0: no batches, and
 *                                                 none of the six below)
 *   RB_COUNTED                                    1: a batch takes up to `max` chains RB_PENDING counted,
 *                                                 as many as are plain (split: the count of avail->idx);
 *                                                 0: up to `max` chains nothing counted (packed: the
 *                                                 batch reads their flags itself)
 *   RB_POP_BATCH(vq, mem, writable, segs, chains, max)  single-segment chains, each validated as RB_POP
 *                                                 would (as RB_COUNTED says how many); the rest untouched
 *   RB_UNPOP_REST(vq, chains, n)                  give back chains[0..n) of a batch, taken and not used
 *   RB_MARK_OF(c)                                 the position of chain c (a mark)
 *   RB_TAKE_RUN(vq, mem, nm, refs, hdr_len, pos, space, &npending, pending, out)
 *                                                 the plain frames next in the ring taken straight into the
 *                                                 slots from pos, as take_plain would take them
 *   RB_PUT_RUN(vq, mem, nm, refs, pos, left, &npending, pending, out)
 *                                                 the plain frames of the slots from pos put straight into
 *                                                 the ring's next chains, as put_plain would
 * Layout-independent helpers (segments, slots, sources, offloads, plain frames) are virtio.c's, defined
 * before it. */

#if RB_BATCH
/* Chains a batch took (RB_POP_BATCH) before the frames that will use them: chains[next..taken), each a whole
 * chain of one segment (segs[k]). They come before any the ring still holds; what is left goes back when the
 * batch kernel ends. With RB_COUNTED they stay in *npending until a frame takes one (they were counted
 * there: what goes back is still counted); without, they were never in it (RB_POP_BATCH saw them available
 * itself). */
struct RB_FN(reserve) {
    RB_CHAIN chains[RB_BATCH];
    struct vq_seg segs[RB_BATCH];
    uint32_t next, taken;
};

/* A batch into an empty reserve, of the `want` chains likely to be used (what is not goes back), up to
 * RB_BATCH: with RB_COUNTED as many of them as are counted; without, when nothing counted is left (counting
 * would read those flags anyway). */
static inline void RB_FN(reserve_fill)(RB_RING *vq, const struct vm_memory *mem, int32_t writable,
                                       struct RB_FN(reserve) *reserve, uint16_t npending, uint64_t want)
{
    if (reserve->next != reserve->taken)
        return;
#if RB_COUNTED
    uint64_t max = want < npending ? want : npending;
#else
    uint64_t max = npending ? 0 : want;
#endif
    if (max > RB_BATCH)
        max = RB_BATCH;
    if (max) {
        reserve->next = 0;
        reserve->taken = RB_POP_BATCH(vq, mem, writable, reserve->segs, reserve->chains, (uint32_t)max);
    }
}

/* Give back what the reserve still holds, taken and not used: it goes first next time. */
static inline void RB_FN(reserve_drop)(RB_RING *vq, struct RB_FN(reserve) *reserve)
{
    RB_UNPOP_REST(vq, reserve->chains + reserve->next, reserve->taken - reserve->next);
    reserve->taken = reserve->next;
}

/* The reserve's next chain is used by a frame: with RB_COUNTED it leaves *npending then. */
static inline void RB_FN(reserve_used)(struct RB_FN(reserve) *reserve, uint16_t *npending)
{
    reserve->next++;
#if RB_COUNTED
    (*npending)--;
#else
    (void)npending;
#endif
}

/* The reserve's next chain into *chain (1), its segment into segs[0] if there is room (`cap`), or 0. */
static inline int RB_FN(reserve_take)(struct RB_FN(reserve) *reserve, uint16_t *npending, struct vq_seg *segs,
                                      uint32_t cap, RB_CHAIN *chain)
{
    if (reserve->next == reserve->taken)
        return 0;
    *chain = reserve->chains[reserve->next];
    if (cap)
        segs[0] = reserve->segs[reserve->next];
    else
        chain->nseg = VQ_NOT_STORED; /* as RB_POP stores none without room */
    RB_FN(reserve_used)(reserve, npending);
    return 1;
}

/* Where the chain RB_FN(take) takes next lies in the ring. */
static inline RB_MARK RB_FN(next_mark)(const RB_RING *vq, const struct RB_FN(reserve) *reserve)
{
    return reserve->next < reserve->taken ? RB_MARK_OF(reserve->chains[reserve->next]) : RB_MARK_AT(vq);
}
#else
/* No batches: the reserve stays empty, the next chain is always the ring's. */
struct RB_FN(reserve) {
    uint32_t next, taken;
};
#define RB_RESERVE_UNUSED __attribute__((unused))
static inline void RB_FN(reserve_fill)(RB_RING *vq RB_RESERVE_UNUSED,
                                       const struct vm_memory *mem RB_RESERVE_UNUSED,
                                       int32_t writable RB_RESERVE_UNUSED,
                                       struct RB_FN(reserve) *reserve RB_RESERVE_UNUSED,
                                       uint16_t npending RB_RESERVE_UNUSED, uint64_t want RB_RESERVE_UNUSED)
{
}
static inline void RB_FN(reserve_drop)(RB_RING *vq RB_RESERVE_UNUSED,
                                       struct RB_FN(reserve) *reserve RB_RESERVE_UNUSED)
{
}
static inline RB_MARK RB_FN(next_mark)(const RB_RING *vq, const struct RB_FN(reserve) *reserve RB_RESERVE_UNUSED)
{
    return RB_MARK_AT(vq);
}
static inline int RB_FN(reserve_take)(struct RB_FN(reserve) *reserve RB_RESERVE_UNUSED,
                                      uint16_t *npending RB_RESERVE_UNUSED, struct vq_seg *segs RB_RESERVE_UNUSED,
                                      uint32_t cap RB_RESERVE_UNUSED, RB_CHAIN *chain RB_RESERVE_UNUSED)
{
    return 0;
}
#undef RB_RESERVE_UNUSED
#endif

/* The next chain, validated as RB_POP validates it: the reserve's first, else the ring's next (counted in
 * *npending, counted again by RB_REFILL when the count ran out), its segments in segs up to `cap` (none
 * stored: nseg VQ_NOT_STORED, as RB_POP). 1: taken; 0: none available; -1: the driver's fault (out). */
static inline int RB_FN(take)(RB_RING *vq, const struct vm_memory *mem, int32_t writable,
                              struct RB_FN(reserve) *reserve, uint16_t *npending, struct vq_seg *segs,
                              uint32_t cap, RB_CHAIN *chain, struct vq_batch *out)
{
    if (RB_FN(reserve_take)(reserve, npending, segs, cap, chain))
        return 1;
    if (!*npending && !RB_REFILL(vq, npending))
        return 0;
    if (RB_POP(vq, mem, writable, segs, cap, chain, out) != VQ_OK)
        return -1;
    (*npending)--;
    return 1;
}

/* Give back chain c, the last taken, and what the reserve holds after it: it goes first next time. */
static inline void RB_FN(give_back)(RB_RING *vq, struct RB_FN(reserve) *reserve, RB_CHAIN *c)
{
    RB_FN(reserve_drop)(vq, reserve);
    RB_UNPOP(vq, c);
}

/* The chains the driver made available counted (RB_PENDING into *npending) once a batch, when a frame first
 * needs one (*counted says it was): VQ_OK, or the driver's fault (out), a count it cannot have made. */
static inline int32_t RB_FN(count_once)(RB_RING *vq, uint16_t *npending, int *counted, struct vq_batch *out)
{
    if (*counted)
        return VQ_OK;
    if (RB_PENDING(vq, npending, out) != VQ_OK)
        return out->status;
    *counted = 1;
    return VQ_OK;
}

#if RB_BATCH
/* The chain of one segment `seg` taken, into the slot at `pos`, as the dequeue below would take it, when it is
 * the plain case: a frame of 1..buf_size bytes after a header that asks for nothing (or no host offloads),
 * that one slot refers to (with `refs`: as long as min_head, a ticket left) or is copied into (without).
 * Then the same slot, ticket, used entry and counters as the dequeue, without the segment lists, the count
 * of slots (a division) and the slot position's modulo: 1. Anything else (a short chain, an empty or long
 * frame, a header that asks, a frame to copy in a one-copy pass, no room): 0, nothing touched, and the
 * dequeue meets the chain with every check and fault of its own. The header is read last, once here (and
 * once more by the dequeue if it asks for work). */
static inline int RB_FN(take_plain)(const RB_RING *vq, const struct nm_bufs *nm, struct vq_refs *refs,
                                    uint32_t hdr_len, const RB_CHAIN *chain, const struct vq_seg *seg,
                                    uint32_t pos, uint32_t space, RB_ELEM *elem, struct vq_batch *out)
{
    uint32_t length;
    if (chain->nseg != 1 || !space || (refs && refs->count >= refs->cap) ||
        !vq_plain_tx(nm, refs, vq->host_offloads, hdr_len, seg, &length))
        return 0;
    vq_plain_into_slot(nm, refs, pos, seg->host + hdr_len, length);
    *elem = RB_USED(*chain, 0);
    out->slots++;
    out->packets++;
    out->bytes += length;
    return 1;
}

/* The frame at slot `pos` put as put would put it, when it is the plain case: one slot without a header of
 * its own (NS_VNET_HDR) and a 12-byte virtio-net header, into the reserve's next chain (filled here as the
 * enqueue would fill it: `left` frames to go), which holds it all. Then the same bytes (the zero header with
 * num_buffers 1, the frame), the same used entry and counters as put and scatter, without the frame source,
 * the segment lists and the chain loop: 1. Anything else (a slot whose len passes buf_size, a chain too
 * short, a ticket naming fewer bytes than the slot's len): 0, nothing but the reserve touched, and put meets
 * the frame with every check and fault of its own. The slot's len, flags and ticket are read once each. The
 * chains are counted (count_once) where put would count them; -1 when that count is the driver's fault. */
static inline int RB_FN(put_plain)(RB_RING *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                   const struct vq_refs *refs, uint32_t pos, uint32_t left, uint16_t *npending,
                                   int *avail_read, struct RB_FN(reserve) *reserve, RB_ELEM *elem,
                                   struct vq_batch *out)
{
    const uint8_t *data;
    uint16_t len;
    if (!vq_plain_slot(nm, refs, pos, &data, &len))
        return 0;
    if (RB_FN(count_once)(vq, npending, avail_read, out) != VQ_OK)
        return -1;
    RB_FN(reserve_fill)(vq, mem, 1, reserve, *npending, left);
    if (reserve->next == reserve->taken)
        return 0;
    const RB_CHAIN *chain = &reserve->chains[reserve->next];
    const struct vq_seg *seg = &reserve->segs[reserve->next];
    if (chain->len < (uint64_t)VIRTIO_NET_HDR_SIZE + len)
        return 0;
    vq_plain_into_chain(mem, vq->log_dirty, seg, data, len, out);
    *elem = RB_USED(*chain, VIRTIO_NET_HDR_SIZE + len);
    RB_FN(reserve_used)(reserve, npending);
    out->packets++;
    out->bytes += len;
    return 1;
}
#endif

/* vq_dequeue; with `refs`, vq_dequeue_refs (the frames refer to their chains, nothing is completed). */
static int32_t RB_FN(dequeue_batch)(RB_RING *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                uint32_t hdr_len, uint32_t first, uint32_t space, struct vq_refs *refs,
                                RB_ELEM *pending, struct vq_batch *out)
{
    struct vq_seg segs[VQ_MAX_CHAIN_LENGTH];
    uint32_t n_used = 0, pos = first;
    struct RB_FN(reserve) reserve; /* not zeroed: its arrays are written before they are read */
    reserve.next = reserve.taken = 0;

    vq_batch_init(out);
    if (!RB_ARGS_OK(vq, nm, first, space) || (refs && (refs->count > refs->cap || refs->cap > VQ_REF_MAX)))
        return vq_fail(out, VQ_ERR_ARGUMENT, 0);
    uint16_t npending;
    if (RB_PENDING(vq, &npending, out) != VQ_OK)
        return out->status;
    while (space) {
        RB_CHAIN chain;
#if RB_BATCH
        /* A run of plain frames straight into the slots, when the reserve is empty. */
        if (reserve.next == reserve.taken) {
            uint32_t took = RB_TAKE_RUN(vq, mem, nm, refs, hdr_len, pos, space, &npending, pending + n_used, out);
            if (took) {
                n_used += took;
                pos = (pos + took) % nm->num_slots;
                space -= took;
                continue;
            }
        }
#endif
        RB_FN(reserve_fill)(vq, mem, 0, &reserve, npending, space);
        int took = RB_FN(take)(vq, mem, 0, &reserve, &npending, segs, VQ_MAX_CHAIN_LENGTH, &chain, out);
        if (took < 0)
            goto fault;
        if (!took)
            break;
#if RB_BATCH
        if (RB_FN(take_plain)(vq, nm, refs, hdr_len, &chain, segs, pos, space, pending + n_used, out)) {
            n_used++;
            pos = pos + 1 == nm->num_slots ? 0 : pos + 1;
            space--;
            continue;
        }
#endif
        if (chain.len < hdr_len) {
            vq_fail_chain(out, VQ_ERR_SHORT_TX, RB_HEAD(chain), chain.len);
            goto fault;
        }
        uint64_t length = chain.len - hdr_len;
        if (length == 0 || length > VQ_MAX_FRAME) {
            /* An empty or oversized frame is the guest's business: complete it and count the drop. */
            pending[n_used++] = RB_USED(chain, 0);
            out->dropped++;
            continue;
        }
        /* The frame's slots get its bytes from `skip` on: without the header, or (NS_VNET_HDR) with it. */
        uint64_t skip = hdr_len;
        uint16_t mark = 0;
        struct nm_vnet_hdr h;
        if (vq->host_offloads && vq_offload_header(segs, chain.nseg, &h)) {
            int pass =
                hdr_len == VIRTIO_NET_HDR_SIZE && !(nm_offload_needs(&h) & ~(uint32_t)vq->pass_offloads);
            if (pass) {
                if (!vq_offload_passes(segs, chain.nseg, hdr_len, (uint32_t)length, &h)) {
                    pending[n_used++] = RB_USED(chain, 0);
                    out->dropped++;
                    out->bad_headers++;
                    continue;
                }
                skip = 0;
                length += hdr_len;
                mark = NS_VNET_HDR;
            } else {
                uint32_t used = 0;
                int done = vq_dequeue_offloaded(nm, segs, chain.nseg, hdr_len, (uint32_t)length, &h, pos,
                                                space, &used, out);
                if (done == VQ_OFFLOAD_LATER) {
                    RB_FN(give_back)(vq, &reserve, &chain);
                    out->held = 1;
                    break;
                }
                pending[n_used++] = RB_USED(chain, 0);
                if (done == VQ_OFFLOAD_DROPPED) {
                    out->dropped++;
                    out->bad_headers++;
                    continue;
                }
                pos = (pos + used) % nm->num_slots;
                space -= used;
                out->slots += used;
                out->offloaded++;
                continue;
            }
        }
        uint32_t need = (uint32_t)((length + nm->buf_size - 1) / nm->buf_size);
        uint32_t nref =
            refs ? vq_ref_slots(nm, refs, segs, chain.nseg, skip, refs->min_head + (mark ? hdr_len : 0), space)
                 : 0;
        if (nref) {
            vq_refer(nm, refs, segs, chain.nseg, skip, pos);
            need = nref;
        } else if (need > space) {
            RB_FN(give_back)(vq, &reserve, &chain);
            out->held = 1;
            break;
        } else {
            vq_gather(nm, segs, chain.nseg, skip, pos);
        }
        if (mark) {
            struct nm_slot *slot = nm_slot_at(nm, pos);
            slot->flags |= mark;
            length -= hdr_len; /* what the counters count is the frame */
            out->passed++;
        }
        pending[n_used++] = RB_USED(chain, 0);
        pos = (pos + need) % nm->num_slots;
        space -= need;
        out->slots += need;
        out->packets++;
        out->bytes += length;
    }
    RB_FN(reserve_drop)(vq, &reserve); /* the space ran out first */
    if (refs)
        out->used = n_used; /* for vq_publish, once the frames were copied */
    else
        RB_COMPLETE(vq, mem, pending, n_used, out);
    return VQ_OK;
fault:
    RB_FN(reserve_drop)(vq, &reserve); /* a chain faulted: those after it were never taken */
    out->used = n_used;
    return out->status;
}

/* --- enqueue ---------------------------------------------------------------------------------------- */

/* rxtx._scatter: write the header of `src` and its frame across the `nchains` reserved chains, whose heads
 * were taken one after the other from `mark` on (RB_MARK_AT before the first). The first `stored` chains have
 * their segments in `segs`, one after the other, their counts in chains[k].len; the others are walked again
 * (validated again) into `segs` (RB_REWALK, the ring's position of chain k kept in `at`). Sets chains[k].len
 * to the bytes written into chain k. */
__attribute__((always_inline)) static inline int32_t
RB_FN(scatter)(const RB_RING *vq, const struct vm_memory *mem, struct vq_source *src, uint32_t hdr_len,
               uint64_t frame_len, RB_ELEM *chains, uint32_t nchains, uint32_t stored, RB_MARK mark,
               struct vq_seg *segs, struct vq_batch *out)
{
    uint16_t num_buffers = (uint16_t)nchains;
    uint32_t hdr_bytes = hdr_len < VIRTIO_NET_HDR_SIZE ? hdr_len : VIRTIO_NET_HDR_SIZE;
    uint64_t remaining = hdr_bytes + frame_len;
    uint32_t next_seg = 0;
    RB_MARK at = mark;

    memcpy(src->hdr + VIRTIO_NET_HDR_SIZE - 2, &num_buffers, 2);
    src->rest = src->p;
    src->rest_left = src->left;
    src->p = src->hdr;
    src->left = hdr_bytes;
    for (uint32_t k = 0; k < nchains; k++) {
        const struct vq_seg *cs;
        uint32_t nseg;
        if (k < stored) {
            cs = segs + next_seg;
            nseg = chains[k].len;
            next_seg += nseg;
        } else {
            int32_t status = RB_REWALK(vq, mem, &at, &chains[k], segs, &nseg, out);
            if (status != VQ_OK)
                return status;
            cs = segs;
        }
        RB_NEXT(vq, &at, &chains[k]);
        uint32_t written = 0;
        for (uint32_t j = 0; j < nseg && remaining; j++) {
            uint32_t n = cs[j].len < remaining ? cs[j].len : (uint32_t)remaining;
            uint32_t copied = vq_source_copy(src, cs[j].host, n);
            if (vq->log_dirty)
                vq_log_write(mem, cs[j].gpa, copied, out);
            written += copied;
            remaining = copied < n ? 0 : remaining - n;
        }
        chains[k].len = written;
    }
    return VQ_OK;
}

/* rxtx._reserve and _scatter: receive chains for the header and the `frame_len` bytes of `src` (one chain
 * without mergeable buffers), into chains[0..*nchains), and the frame written there (DONE: also when the
 * chain was too small, its entry then of length 0 and the frame counted dropped); NO_ROOM (the chains given
 * back, *nchains 0) when the guest has too few; FAULT (out->status) on a driver fault. The chains come from
 * `reserve` first, then the ring (*npending: those the driver made available, counted and not yet taken).
 * Inlined into both callers: it is the enqueue's step per frame, and as a call it kept the reserve in memory. */
__attribute__((always_inline)) static inline int
RB_FN(put)(RB_RING *vq, const struct vm_memory *mem, struct vq_source *src, uint32_t hdr_len, int32_t mergeable,
           uint64_t frame_len, RB_ELEM *chains, uint32_t *nchains, uint16_t *npending,
           struct RB_FN(reserve) *reserve, struct vq_seg *segs, struct vq_batch *out)
{
    uint64_t need = (uint64_t)hdr_len + frame_len, got = 0;
    uint32_t n = 0, stored = 0, nsegs = 0;
    /* A frame that gives its chains back has taken the whole reserve: its mark is where the reserve was. */
    RB_MARK mark = RB_FN(next_mark)(vq, reserve);
    *nchains = 0;
    while (got < need) {
        RB_CHAIN chain;
        uint32_t cap = stored == n ? VQ_MAX_CHAIN_LENGTH - nsegs : 0;
        int took = RB_FN(take)(vq, mem, 1, reserve, npending, segs + nsegs, cap, &chain, out);
        if (took < 0)
            return VQ_PUT_FAULT;
        if (!took) {
            /* The guest has no room now; its next kick brings us back. */
            RB_REWIND(vq, mark, chains, n);
            *npending += (uint16_t)n;
            return VQ_PUT_NO_ROOM;
        }
        if (chain.len < hdr_len) {
            vq_fail_chain(out, VQ_ERR_SHORT_RX, RB_HEAD(chain), chain.len);
            return VQ_PUT_FAULT;
        }
        if (chain.nseg != VQ_NOT_STORED && stored == n) {
            nsegs += chain.nseg;
            stored++;
        }
        chains[n++] = RB_USED(chain, chain.nseg);
        got += chain.len;
        if (!mergeable)
            break;
    }
    if (got < need) {
        for (uint32_t k = 0; k < n; k++)
            chains[k].len = 0;
        out->dropped++;
    } else {
        if (RB_FN(scatter)(vq, mem, src, hdr_len, frame_len, chains, n, stored, mark, segs, out) != VQ_OK)
            return VQ_PUT_FAULT;
        out->packets++;
        out->bytes += frame_len;
    }
    *nchains = n;
    return VQ_PUT_DONE;
}

/* The `nseg` segments vq_complete_frame made, put one after the other (vq_put), all of them or (NO_ROOM:
 * chains given back, counters as they were) none. chains and *nchains as vq_put's, for all segments. */
__attribute__((cold, noinline)) static int RB_FN(put_segments)(RB_RING *vq, const struct vm_memory *mem,
                                                           uint32_t nseg, uint32_t hdr_len, int32_t mergeable,
                                                           RB_ELEM *chains, uint32_t *nchains,
                                                           uint16_t *npending,
                                                           struct RB_FN(reserve) *reserve,
                                                           struct vq_seg *segs, struct vq_batch *out)
{
    const struct vq_offload_scratch *s = vq_offload_scratch;
    uint32_t packets = out->packets, dropped = out->dropped;
    uint64_t bytes = out->bytes;
    uint32_t total = 0, off = 0;
    RB_MARK mark = RB_MARK_AT(vq);
    *nchains = 0;
    for (uint32_t k = 0; k < nseg; k++) {
        struct vq_source seg = {.p = s->out + off, .left = s->lens[k]}; /* hdr: zeros, asks for nothing */
        uint32_t n;
        int put = RB_FN(put)(vq, mem, &seg, hdr_len, mergeable, s->lens[k], chains + total, &n, npending,
                             reserve, segs, out);
        if (put == VQ_PUT_FAULT)
            return VQ_PUT_FAULT;
        if (put == VQ_PUT_NO_ROOM) {
            /* Segments go whole or not at all: the earlier ones' chains go back (their bytes stay written in
             * buffers the guest still owns). */
            RB_REWIND(vq, mark, chains, total);
            *npending += (uint16_t)total;
            out->packets = packets;
            out->bytes = bytes;
            out->dropped = dropped;
            return VQ_PUT_NO_ROOM;
        }
        total += n;
        off += s->lens[k];
    }
    out->offloaded++;
    *nchains = total;
    return VQ_PUT_DONE;
}

static int32_t RB_FN(enqueue_batch)(RB_RING *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                uint32_t hdr_len, int32_t mergeable, uint32_t first, uint32_t count,
                                const struct vq_refs *refs, RB_ELEM *pending, struct vq_batch *out)
{
    struct vq_seg segs[VQ_MAX_CHAIN_LENGTH];
    uint32_t n_used = 0, pos = first, done = 0;
    uint16_t npending = 0;
    int avail_read = 0;
    struct RB_FN(reserve) reserve; /* not zeroed: its arrays are written before they are read */
    reserve.next = reserve.taken = 0;

    vq_batch_init(out);
    if (!RB_ARGS_OK(vq, nm, first, count))
        return vq_fail(out, VQ_ERR_ARGUMENT, 0);
#if RB_BATCH
    const int plain = hdr_len == VIRTIO_NET_HDR_SIZE;
#endif
    while (done < count) {
#if RB_BATCH
        /* A run of plain frames straight into the ring's chains, when the reserve is empty; counted where
         * put_plain would count them, once the first slot is plain. */
        const uint8_t *data;
        uint16_t len;
        if (plain && reserve.next == reserve.taken && vq_plain_slot(nm, refs, pos, &data, &len)) {
            if (RB_FN(count_once)(vq, &npending, &avail_read, out) != VQ_OK)
                goto fault;
            uint32_t put = RB_PUT_RUN(vq, mem, nm, refs, pos, count - done, &npending, pending + n_used, out);
            if (put) {
                n_used += put;
                done += put;
                pos = (pos + put) % nm->num_slots;
                continue;
            }
        }
        int put_plain = plain ? RB_FN(put_plain)(vq, mem, nm, refs, pos, count - done, &npending, &avail_read,
                                                 &reserve, pending + n_used, out)
                              : 0;
        if (put_plain < 0)
            goto fault;
        if (put_plain) {
            n_used++;
            done++;
            pos = pos + 1 == nm->num_slots ? 0 : pos + 1;
            continue;
        }
#endif
        uint32_t nfrag;
        uint64_t frame_len;
        uint16_t first_flags = 0;
        if (vq_frame_at(nm, pos, count - done, &nfrag, &frame_len, &first_flags, out) <= 0)
            break; /* its last fragment has not been published yet (or the ring user broke a slot) */

        struct vq_source src;
        struct nm_vnet_hdr h;
        int how = vq_source_open(vq->guest_offloads, nm, refs, pos, nfrag, first_flags, &frame_len, &src, &h);
        uint32_t nseg = how == VQ_SRC_COMPLETE ? vq_complete_frame(&src, &h, frame_len) : 0;
        if (how == VQ_SRC_DROP || (how == VQ_SRC_COMPLETE && !nseg)) {
            out->dropped++;
            out->bad_headers++;
            done += nfrag;
            pos = (pos + nfrag) % nm->num_slots;
            continue;
        }

        if (RB_FN(count_once)(vq, &npending, &avail_read, out) != VQ_OK)
            goto fault;
        if (how != VQ_SRC_WRITE) /* segments go whole or not at all, chains from the ring (rare) */
            RB_FN(reserve_drop)(vq, &reserve);
        else /* this frame's chains and the next ones' (the slots left say they are likely all filled) */
            RB_FN(reserve_fill)(vq, mem, 1, &reserve, npending, count - done);
        uint32_t nchains;
        int put = how == VQ_SRC_WRITE ? RB_FN(put)(vq, mem, &src, hdr_len, mergeable, frame_len, pending + n_used,
                                                   &nchains, &npending, &reserve, segs, out)
                                      : RB_FN(put_segments)(vq, mem, nseg, hdr_len, mergeable, pending + n_used,
                                                            &nchains, &npending, &reserve, segs, out);
        if (put == VQ_PUT_FAULT)
            goto fault;
        if (put == VQ_PUT_NO_ROOM)
            goto complete;
        n_used += nchains;
        done += nfrag;
        pos = (pos + nfrag) % nm->num_slots;
    }
complete:
    RB_FN(reserve_drop)(vq, &reserve); /* frames ran out first */
    out->slots = done;
    RB_COMPLETE(vq, mem, pending, n_used, out);
    return VQ_OK;
fault:
    RB_FN(reserve_drop)(vq, &reserve); /* never taken, as in rxtx */
    out->slots = done;
    out->used = n_used;
    return out->status;
}

#undef RB_FN
#undef RB_RING
#undef RB_ELEM
#undef RB_CHAIN
#undef RB_MARK
#undef RB_HEAD
#undef RB_USED
#undef RB_ARGS_OK
#undef RB_PENDING
#undef RB_REFILL
#undef RB_POP
#undef RB_UNPOP
#undef RB_MARK_AT
#undef RB_REWIND
#undef RB_REWALK
#undef RB_NEXT
#undef RB_COMPLETE
#undef RB_BATCH
#undef RB_COUNTED
#undef RB_POP_BATCH
#undef RB_UNPOP_REST
#undef RB_MARK_OF
#undef RB_TAKE_RUN
#undef RB_PUT_RUN
