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
 *   RB_BATCH                                      chains RB_POP_BATCH takes at once (0: no batches)
 *   RB_POP_BATCH(vq, mem, writable, segs, chains) RB_BATCH single-segment chains, each validated as RB_POP
 *                                                 would, or none (0) and nothing touched
 *   RB_UNPOP_REST(vq, chains, n)                  give back chains[0..n) of a batch, taken and not used
 *   RB_MARK_OF(c)                                 the position of chain c (a mark)
 * Layout-independent helpers (segments, slots, sources, offloads) are virtio.c's, defined before it. */

/* Give back chain c, the last the dequeue took, and what a batch took after it: it goes first next time. */
#if RB_BATCH
#define RB_GIVE_BACK(vq, c) (RB_UNPOP_REST(vq, batch + next, taken - next), taken = next, RB_UNPOP(vq, c))
#else
#define RB_GIVE_BACK RB_UNPOP
#endif

/* vq_dequeue; with `refs`, vq_dequeue_refs (the frames refer to their chains, nothing is completed). */
static int32_t RB_FN(dequeue_batch)(RB_RING *vq, const struct vm_memory *mem, const struct nm_bufs *nm,
                                uint32_t hdr_len, uint32_t first, uint32_t space, struct vq_refs *refs,
                                RB_ELEM *pending, struct vq_batch *out)
{
    struct vq_seg segs[VQ_MAX_CHAIN_LENGTH];
    uint32_t n_used = 0, pos = first;
#if RB_BATCH
    /* Chains a batch took (RB_POP_BATCH) and the loop has not yet: batch[next..taken). */
    RB_CHAIN batch[RB_BATCH];
    struct vq_seg batch_segs[RB_BATCH];
    uint32_t next = 0, taken = 0;
#endif

    vq_batch_init(out);
    if (!RB_ARGS_OK(vq, nm, first, space) || (refs && (refs->count > refs->cap || refs->cap > VQ_REF_MAX)))
        return vq_fail(out, VQ_ERR_ARGUMENT, 0);
    uint16_t npending;
    if (RB_PENDING(vq, &npending, out) != VQ_OK)
        return out->status;
#if RB_BATCH
    /* npending counts chains RB_REFILL found and the loop has not taken; a batch's chains were never counted
     * (RB_POP_BATCH saw them available): a batch is tried when nothing counted is left, and counting is
     * left for what a batch does not take. */
    while (space) {
        RB_CHAIN chain;
        if (next == taken && !npending && space >= RB_BATCH) {
            next = 0;
            taken = RB_POP_BATCH(vq, mem, 0, batch_segs, batch);
        }
        if (next < taken) {
            chain = batch[next];
            segs[0] = batch_segs[next++];
        } else {
            if (!npending && !RB_REFILL(vq, &npending))
                break;
            if (RB_POP(vq, mem, 0, segs, VQ_MAX_CHAIN_LENGTH, &chain, out) != VQ_OK)
                goto fault;
            npending--;
        }
#else
    while (space && (npending || RB_REFILL(vq, &npending))) {
        RB_CHAIN chain;
        if (RB_POP(vq, mem, 0, segs, VQ_MAX_CHAIN_LENGTH, &chain, out) != VQ_OK)
            goto fault;
        npending--;
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
                    RB_GIVE_BACK(vq, &chain);
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
            RB_GIVE_BACK(vq, &chain);
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
#if RB_BATCH
    RB_UNPOP_REST(vq, batch + next, taken - next); /* the space ran out first */
#endif
    if (refs)
        out->used = n_used; /* for vq_publish, once the frames were copied */
    else
        RB_COMPLETE(vq, mem, pending, n_used, out);
    return VQ_OK;
fault:
#if RB_BATCH
    RB_UNPOP_REST(vq, batch + next, taken - next); /* a chain faulted: those after it were never taken */
#endif
    out->used = n_used;
    return out->status;
}

/* --- enqueue ---------------------------------------------------------------------------------------- */

/* rxtx._scatter: write the header of `src` and its frame across the `nchains` reserved chains, whose heads
 * were taken one after the other from `mark` on (RB_MARK_AT before the first). The first `stored` chains have
 * their segments in `segs`, one after the other, their counts in chains[k].len; the others are walked again
 * (validated again) into `segs` (RB_REWALK, the ring's position of chain k kept in `at`). Sets chains[k].len
 * to the bytes written into chain k. */
static int32_t RB_FN(scatter)(const RB_RING *vq, const struct vm_memory *mem, struct vq_source *src,
                              uint32_t hdr_len, uint64_t frame_len, RB_ELEM *chains, uint32_t nchains,
                              uint32_t stored, RB_MARK mark, struct vq_seg *segs, struct vq_batch *out)
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

#if RB_BATCH
/* Receive chains a batch took before the frames that will fill them: chains[next..taken), each a whole chain
 * of one segment (segs[k]). put takes them first, in order; what is left goes back when the enqueue ends. */
struct RB_FN(reserve) {
    RB_CHAIN chains[RB_BATCH];
    struct vq_seg segs[RB_BATCH];
    uint32_t next, taken;
};
#define RB_RESERVE_PARAM , struct RB_FN(reserve) *reserve
#define RB_RESERVE_ARG(r) , (r)
#else
#define RB_RESERVE_PARAM
#define RB_RESERVE_ARG(r)
#endif

/* rxtx._reserve and _scatter: receive chains for the header and the `frame_len` bytes of `src` (one chain
 * without mergeable buffers), into chains[0..*nchains), and the frame written there (DONE: also when the
 * chain was too small, its entry then of length 0 and the frame counted dropped); NO_ROOM (the chains given
 * back, *nchains 0) when the guest has too few; FAULT (out->status) on a driver fault. *npending: chains the
 * driver made available and we have not taken (those of `reserve` among them: taken first, may be NULL). */
static inline int RB_FN(put)(RB_RING *vq, const struct vm_memory *mem, struct vq_source *src,
                         uint32_t hdr_len, int32_t mergeable, uint64_t frame_len, RB_ELEM *chains,
                         uint32_t *nchains, uint16_t *npending, struct vq_seg *segs,
                         struct vq_batch *out RB_RESERVE_PARAM)
{
    uint64_t need = (uint64_t)hdr_len + frame_len, got = 0;
    uint32_t n = 0, stored = 0, nsegs = 0;
    RB_MARK mark = RB_MARK_AT(vq);
#if RB_BATCH
    if (reserve && reserve->next < reserve->taken) /* the frame's chains start with the reserve's */
        mark = RB_MARK_OF(reserve->chains[reserve->next]);
#endif
    *nchains = 0;
    while (got < need) {
#if RB_BATCH
        RB_CHAIN chain;
        uint32_t cap = stored == n ? VQ_MAX_CHAIN_LENGTH - nsegs : 0;
        /* The reserve's chains first (not counted in *npending); a frame that gives its chains back has taken
         * the whole reserve, and its mark is where the reserve was. */
        if (reserve && reserve->next < reserve->taken) {
            chain = reserve->chains[reserve->next];
            if (cap)
                segs[nsegs] = reserve->segs[reserve->next];
            else
                chain.nseg = VQ_NOT_STORED; /* as RB_POP stores none without room */
            reserve->next++;
        } else {
            if (!*npending && !RB_REFILL(vq, npending)) {
                /* The guest has no room now; its next kick brings us back. */
                RB_REWIND(vq, mark, chains, n);
                *npending += (uint16_t)n;
                return VQ_PUT_NO_ROOM;
            }
            if (RB_POP(vq, mem, 1, segs + nsegs, cap, &chain, out) != VQ_OK)
                return VQ_PUT_FAULT;
            (*npending)--;
        }
        if (chain.len < hdr_len) {
            vq_fail_chain(out, VQ_ERR_SHORT_RX, RB_HEAD(chain), chain.len);
            return VQ_PUT_FAULT;
        }
#else
        if (!*npending && !RB_REFILL(vq, npending)) {
            /* The guest has no room now; its next kick brings us back. */
            RB_REWIND(vq, mark, chains, n);
            *npending += (uint16_t)n;
            return VQ_PUT_NO_ROOM;
        }
        RB_CHAIN chain;
        uint32_t cap = stored == n ? VQ_MAX_CHAIN_LENGTH - nsegs : 0;
        if (RB_POP(vq, mem, 1, segs + nsegs, cap, &chain, out) != VQ_OK)
            return VQ_PUT_FAULT;
        if (chain.len < hdr_len) {
            vq_fail_chain(out, VQ_ERR_SHORT_RX, RB_HEAD(chain), chain.len);
            return VQ_PUT_FAULT;
        }
        (*npending)--;
#endif
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
                                                           uint16_t *npending, struct vq_seg *segs,
                                                           struct vq_batch *out)
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
        int put = RB_FN(put)(vq, mem, &seg, hdr_len, mergeable, s->lens[k], chains + total, &n, npending, segs,
                             out RB_RESERVE_ARG(NULL));
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
#if RB_BATCH
    struct RB_FN(reserve) reserve = {.next = 0, .taken = 0};
#endif

    vq_batch_init(out);
    if (!RB_ARGS_OK(vq, nm, first, count))
        return vq_fail(out, VQ_ERR_ARGUMENT, 0);
    while (done < count) {
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

        if (!avail_read) {
            /* Read once, when a frame first needs a chain (a count the driver cannot have made is its fault). */
            if (RB_PENDING(vq, &npending, out) != VQ_OK)
                goto fault;
            avail_read = 1;
        }
#if RB_BATCH
        if (how != VQ_SRC_WRITE) { /* segments go whole or not at all, chains from the ring (rare) */
            RB_UNPOP_REST(vq, reserve.chains + reserve.next, reserve.taken - reserve.next);
            reserve.taken = reserve.next;
        } else if (reserve.next == reserve.taken && !npending && count - done >= RB_BATCH) {
            /* The chains of this frame and of the next ones, at once, when nothing counted is left and the
             * slots left say they are likely all filled (what is not goes back at the end). */
            reserve.next = 0;
            reserve.taken = RB_POP_BATCH(vq, mem, 1, reserve.segs, reserve.chains);
        }
#endif
        uint32_t nchains;
        int put = how == VQ_SRC_WRITE ? RB_FN(put)(vq, mem, &src, hdr_len, mergeable, frame_len, pending + n_used,
                                               &nchains, &npending, segs, out RB_RESERVE_ARG(&reserve))
                                      : RB_FN(put_segments)(vq, mem, nseg, hdr_len, mergeable, pending + n_used,
                                                        &nchains, &npending, segs, out);
        if (put == VQ_PUT_FAULT)
            goto fault;
        if (put == VQ_PUT_NO_ROOM)
            goto complete;
        n_used += nchains;
        done += nfrag;
        pos = (pos + nfrag) % nm->num_slots;
    }
complete:
#if RB_BATCH
    RB_UNPOP_REST(vq, reserve.chains + reserve.next, reserve.taken - reserve.next); /* frames ran out first */
#endif
    out->slots = done;
    RB_COMPLETE(vq, mem, pending, n_used, out);
    return VQ_OK;
fault:
#if RB_BATCH
    RB_UNPOP_REST(vq, reserve.chains + reserve.next, reserve.taken - reserve.next); /* never taken, as in rxtx */
#endif
    out->slots = done;
    out->used = n_used;
    return out->status;
}

#undef RB_RESERVE_PARAM
#undef RB_RESERVE_ARG

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
#undef RB_POP_BATCH
#undef RB_UNPOP_REST
#undef RB_MARK_OF
#undef RB_GIVE_BACK
