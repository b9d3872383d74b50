/* Offloads completed in software (see offload.cdef). The reference is vhostmap/netmap/offload.py. */
#include <string.h>

#include "kernels.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define VLAN_HLEN 4
#define IPV4_MIN_HLEN 20
#define IPV6_HLEN 40
#define TCP_MIN_HLEN 20
#define UDP_HLEN 8
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define TCP_CSUM_OFFSET 16 /* offsetof(struct tcphdr, check) */
#define UDP_CSUM_OFFSET 6  /* offsetof(struct udphdr, check) */
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80
#define CSUM_MANGLED_0 0xffff

static inline uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    put16(p, (uint16_t)(v >> 16));
    put16(p + 2, (uint16_t)v);
}

/* The ones' complement sum of `n` bytes as big-endian 16-bit words (an odd last byte padded), from `sum`,
 * unfolded. */
static uint64_t ones_add(const uint8_t *p, uint32_t n, uint64_t sum)
{
    uint32_t k = 0;
    for (; k + 4 <= n; k += 4)
        sum += get32(p + k);
    for (; k + 2 <= n; k += 2)
        sum += get16(p + k);
    if (k < n)
        sum += (uint32_t)p[k] << 8;
    return sum;
}

static uint16_t ones_fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* The layers of a frame to segment as `kind`: IP header at *l3, IPv4 or not, transport header at *l4 with
 * protocol *proto; 0, or -1 when the frame is not that. */
static int layers(const uint8_t *f, uint32_t len, uint8_t kind, uint32_t *l3, int *ipv4, uint32_t *l4,
                  uint8_t *proto)
{
    if (len < ETH_HLEN)
        return -1;
    uint32_t at = ETH_HLEN;
    uint16_t type = get16(f + 12);
    if (type == ETH_P_8021Q) {
        if (len < ETH_HLEN + VLAN_HLEN)
            return -1;
        at = ETH_HLEN + VLAN_HLEN;
        type = get16(f + 16);
    }
    uint8_t want = kind == VIRTIO_NET_HDR_GSO_UDP_L4 ? IPPROTO_UDP : IPPROTO_TCP;
    *l3 = at;
    *proto = want;
    if (type == ETH_P_IP && kind != VIRTIO_NET_HDR_GSO_TCPV6) {
        if (len < at + IPV4_MIN_HLEN || f[at] >> 4 != 4)
            return -1;
        uint32_t ihl = 4u * (f[at] & 0x0f);
        if (ihl < IPV4_MIN_HLEN || len < at + ihl || f[at + 9] != want || (get16(f + at + 6) & 0x3fff))
            return -1;
        *ipv4 = 1;
        *l4 = at + ihl;
        return 0;
    }
    if (type == ETH_P_IPV6 && kind != VIRTIO_NET_HDR_GSO_TCPV4) {
        if (len < at + IPV6_HLEN || f[at] >> 4 != 6 || f[at + 6] != want)
            return -1;
        *ipv4 = 0;
        *l4 = at + IPV6_HLEN;
        return 0;
    }
    return -1;
}

/* Fix the headers of segment k of n, `seg` (`seglen` bytes), as offload.py's _segment does. */
static void fix_segment(uint8_t *seg, uint32_t seglen, uint32_t k, uint32_t n, uint16_t gso_size, uint32_t l3,
                        int ipv4, uint32_t l4, uint8_t proto)
{
    uint32_t l4_len = seglen - l4;
    uint64_t pseudo;
    if (ipv4) {
        put16(seg + l3 + 2, (uint16_t)(seglen - l3));
        put16(seg + l3 + 4, (uint16_t)(get16(seg + l3 + 4) + k));
        put16(seg + l3 + 10, 0);
        put16(seg + l3 + 10, (uint16_t)~ones_fold(ones_add(seg + l3, l4 - l3, 0)));
        pseudo = ones_add(seg + l3 + 12, 8, 0) + proto + l4_len;
    } else {
        put16(seg + l3 + 4, (uint16_t)(seglen - l3 - IPV6_HLEN));
        pseudo = ones_add(seg + l3 + 8, 32, 0) + (l4_len >> 16) + (l4_len & 0xffff) + proto;
    }
    uint32_t where;
    if (proto == IPPROTO_TCP) {
        put32(seg + l4 + 4, get32(seg + l4 + 4) + k * (uint32_t)gso_size);
        if (k + 1 < n)
            seg[l4 + 13] &= (uint8_t)~(TCP_FIN | TCP_PSH);
        if (k > 0)
            seg[l4 + 13] &= (uint8_t)~TCP_CWR;
        where = l4 + 16;
    } else {
        put16(seg + l4 + 4, (uint16_t)l4_len);
        where = l4 + 6;
    }
    put16(seg + where, 0);
    uint16_t csum = (uint16_t)~ones_fold(ones_add(seg + l4, l4_len, ones_fold(pseudo)));
    if (proto == IPPROTO_UDP && csum == 0)
        csum = CSUM_MANGLED_0;
    put16(seg + where, csum);
}

/* How a frame is to be segmented: its layers and the length of its headers (what each segment repeats). */
struct plan {
    uint32_t l3, l4, hlen;
    int ipv4;
    uint8_t proto;
};

/* The checks of nm_offload_check, and for a segmentation (NM_OFF_OK, *segment 1) its plan; `frame` holds
 * the frame's headers at least (see offload.cdef), `len` is the whole frame's length. */
static int32_t plan(const struct nm_vnet_hdr *h, const uint8_t *frame, uint32_t len, int *segment,
                    struct plan *p)
{
    *segment = 0;
    if ((h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && (uint32_t)h->csum_start + h->csum_offset + 2 > len)
        return NM_OFF_BAD_CSUM;
    uint8_t kind = h->gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN;
    if (kind == VIRTIO_NET_HDR_GSO_NONE)
        return NM_OFF_OK;
    if (kind != VIRTIO_NET_HDR_GSO_TCPV4 && kind != VIRTIO_NET_HDR_GSO_TCPV6 && kind != VIRTIO_NET_HDR_GSO_UDP_L4)
        return NM_OFF_BAD_GSO;
    if (h->gso_size == 0 || h->hdr_len > len)
        return NM_OFF_BAD_SIZE;
    if (layers(frame, len, kind, &p->l3, &p->ipv4, &p->l4, &p->proto))
        return NM_OFF_BAD_GSO;
    if (p->proto == IPPROTO_TCP) {
        if (len < p->l4 + TCP_MIN_HLEN || frame[p->l4 + 12] >> 4 < 5)
            return NM_OFF_BAD_GSO;
        p->hlen = p->l4 + 4u * (frame[p->l4 + 12] >> 4);
    } else {
        p->hlen = p->l4 + UDP_HLEN;
    }
    if (len < p->hlen)
        return NM_OFF_BAD_GSO;
    uint32_t plen = len - p->hlen;
    if (p->hlen - p->l3 + (plen < h->gso_size ? plen : h->gso_size) > 0xffff)
        return NM_OFF_BAD_SIZE; /* a segment's IP length would not fit its field */
    *segment = 1;
    return NM_OFF_OK;
}

uint32_t nm_offload_needs(const struct nm_vnet_hdr *h)
{
    uint32_t needs = h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM ? NM_OFF_NEEDS_CSUM : 0;
    switch (h->gso_type & (uint8_t)~VIRTIO_NET_HDR_GSO_ECN) {
    case VIRTIO_NET_HDR_GSO_NONE:
        break;
    case VIRTIO_NET_HDR_GSO_TCPV4:
        needs |= NM_OFF_NEEDS_TSO4;
        break;
    case VIRTIO_NET_HDR_GSO_TCPV6:
        needs |= NM_OFF_NEEDS_TSO6;
        break;
    default: /* UDP_L4; any other type fails nm_offload_check */
        needs |= NM_OFF_NEEDS_USO;
    }
    return needs | (h->gso_type & VIRTIO_NET_HDR_GSO_ECN ? NM_OFF_NEEDS_ECN : 0);
}

int32_t nm_offload_check(const struct nm_vnet_hdr *h, const uint8_t *head, uint32_t have, uint32_t len)
{
    int segment;
    struct plan p;
    if (have < len && have < NM_OFF_HEAD_MAX)
        return NM_OFF_BAD_SIZE; /* the caller's mistake: nothing to judge the headers by */
    int32_t status = plan(h, head, len, &segment, &p);
    if (status != NM_OFF_OK || !segment)
        return status;
    /* Whoever segments it relies on the checksum being left at the transport header (the spec: a driver
     * MUST ask for it with segmentation; Linux's virtio_net_hdr_to_skb refuses the frame otherwise). The
     * completion here computes it itself and does not care. */
    uint32_t field = p.proto == IPPROTO_TCP ? TCP_CSUM_OFFSET : UDP_CSUM_OFFSET;
    if (!(h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) || h->csum_start != p.l4 || h->csum_offset != field)
        return NM_OFF_BAD_CSUM;
    return NM_OFF_OK;
}

int32_t nm_offload_complete(const struct nm_vnet_hdr *h, const uint8_t *frame, uint32_t len, uint8_t *out,
                            uint32_t cap, uint32_t *seg_lens, uint32_t max_segs, uint32_t *nsegs)
{
    *nsegs = 0;
    int segment;
    struct plan p;
    int32_t status = plan(h, frame, len, &segment, &p);
    if (status != NM_OFF_OK)
        return status;
    if (!segment) {
        if (len > cap || max_segs < 1)
            return NM_OFF_NO_ROOM;
        memcpy(out, frame, len);
        if (h->flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
            uint32_t at = (uint32_t)h->csum_start + h->csum_offset;
            uint16_t csum = (uint16_t)~ones_fold(ones_add(out + h->csum_start, len - h->csum_start, 0));
            put16(out + at, csum ? csum : CSUM_MANGLED_0);
        }
        seg_lens[0] = len;
        *nsegs = 1;
        return NM_OFF_OK;
    }
    uint32_t hlen = p.hlen;
    uint32_t plen = len - hlen, g = h->gso_size;
    uint32_t n = plen ? (plen + g - 1) / g : 1;
    if (n > max_segs || (uint64_t)n * hlen + plen > cap)
        return NM_OFF_NO_ROOM;
    uint8_t *seg = out;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t take = plen - k * g < g ? plen - k * g : g;
        memcpy(seg, frame, hlen);
        memcpy(seg + hlen, frame + hlen + k * g, take);
        fix_segment(seg, hlen + take, k, n, (uint16_t)g, p.l3, p.ipv4, p.l4, p.proto);
        seg_lens[k] = hlen + take;
        seg += hlen + take;
    }
    *nsegs = n;
    return NM_OFF_OK;
}
