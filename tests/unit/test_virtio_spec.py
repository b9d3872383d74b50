"""virtio layouts and the EVENT_IDX arithmetic, checked against the spec's definitions."""

from hypothesis import given
from hypothesis import strategies as st

from vhostmap.virtio.spec import (
    VHOST_F_LOG_ALL,
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VRING_DESC,
    VRING_DESC_DTYPE,
    VRING_USED_ELEM,
    VRING_USED_ELEM_DTYPE,
    bit,
    feature_names,
    virtio_net_hdr_size,
    vring_avail_size,
    vring_desc_size,
    vring_need_event,
    vring_used_size,
)

u16 = st.integers(0, 0xFFFF)


def test_layout_sizes_match_the_spec() -> None:
    assert VRING_DESC.size == VRING_DESC_DTYPE.itemsize == 16
    assert VRING_USED_ELEM.size == VRING_USED_ELEM_DTYPE.itemsize == 8
    assert vring_desc_size(256) == 4096
    assert vring_avail_size(256) == 6 + 2 * 256
    assert vring_used_size(256) == 6 + 8 * 256
    assert vring_used_size(256, event_idx=False) == 4 + 8 * 256


def test_net_header_size_follows_features() -> None:
    assert virtio_net_hdr_size(0) == 10
    assert virtio_net_hdr_size(bit(VIRTIO_NET_F_MRG_RXBUF)) == 12
    assert virtio_net_hdr_size(bit(VIRTIO_F_VERSION_1)) == 12


@given(u16, u16, st.integers(0, 0x7FFF))
def test_need_event_is_true_exactly_when_the_event_index_is_crossed(event: int, old: int, moved: int) -> None:
    new = (old + moved) & 0xFFFF
    crossed = any(((old + k) & 0xFFFF) == event for k in range(moved))
    assert vring_need_event(event, new, old) == crossed


def test_feature_names_name_known_bits_and_number_the_others() -> None:
    assert feature_names(bit(VIRTIO_F_VERSION_1) | bit(VHOST_F_LOG_ALL) | bit(61)) == [
        "VHOST_F_LOG_ALL",
        "VIRTIO_F_VERSION_1",
        "bit 61",
    ]
    assert feature_names(0) == []
