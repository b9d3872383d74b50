"""The sans-IO vhost-user parser: every request round-trips with its fds, any split of the byte stream gives
the same messages, malformed messages are skipped (their fds closed) and the next one still parses."""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import socket
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostmap.vhost_user.errors import PayloadError, ProtocolError
from vhostmap.vhost_user.messages import (
    HEADER,
    MAX_FDS,
    REQUESTS,
    U64,
    VHOST_MEMORY_BASELINE_NREGIONS,
    VHOST_USER_MAX_CONFIG_SIZE,
    VHOST_USER_MAX_PAYLOAD_SIZE,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_VRING_F_LOG,
    DeviceConfig,
    Empty,
    InflightDescriptor,
    IotlbMsg,
    LogDescriptor,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    Raw,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
    always_replies,
)
from vhostmap.vhost_user.protocol import (
    NEED_DATA,
    BackendConnection,
    FrontendConnection,
    Message,
    NeedData,
    Payload,
    ack,
    encode,
    reply,
)
from vhostmap.virtio.spec import VHOST_USER_F_PROTOCOL_FEATURES

# --- helpers ------------------------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def no_fd_leak() -> Iterator[None]:
    """The block leaves as many fds open as it found."""
    before = open_fds()
    yield
    assert open_fds() == before


def eventfds(n: int) -> tuple[int, ...]:
    return tuple(os.eventfd(0) for _ in range(n))


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def drain(conn: BackendConnection | FrontendConnection) -> list[Message]:
    """Every complete message buffered in ``conn``."""
    out = []
    while not isinstance(event := conn.next_event(), NeedData):
        out.append(event)
    return out


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


U32 = st.integers(0, 2**32 - 1)
U64S = st.integers(0, 2**64 - 1)
REGION = MemoryRegion(0x1_0000_0000, 0x4000_0000, 0x7F00_0000_0000, 0xC000_0000)
MAC = bytes.fromhex("525400123456")

# One well-formed request per code: its payload and how many fds come with it.
SAMPLES: dict[Request, tuple[Payload, int]] = {
    Request.GET_FEATURES: (Empty(), 0),
    Request.SET_FEATURES: (U64(1 << 32 | 1 << VHOST_USER_F_PROTOCOL_FEATURES), 0),
    Request.SET_OWNER: (Empty(), 0),
    Request.RESET_OWNER: (Empty(), 0),
    Request.SET_MEM_TABLE: (MemoryTable((MemoryRegion(0, 0xA0000, 0x7F00_0000_0000, 0), REGION)), 2),
    Request.SET_LOG_BASE: (LogDescriptor(0x8000, 0), 1),
    Request.SET_LOG_FD: (Empty(), 1),
    Request.SET_VRING_NUM: (VringState(1, 256), 0),
    Request.SET_VRING_ADDR: (
        VringAddr(1, 1 << VHOST_VRING_F_LOG, 0x7F00_0001_0000, 0x7F00_0001_2000, 0x7F00_0001_1000, 0x1_2000),
        0,
    ),
    Request.SET_VRING_BASE: (VringState(1, 7), 0),
    Request.GET_VRING_BASE: (VringState(1, 0), 0),
    Request.SET_VRING_KICK: (VringFile(1), 1),
    Request.SET_VRING_CALL: (VringFile(2, nofd=True), 0),
    Request.SET_VRING_ERR: (VringFile(255), 1),
    Request.GET_PROTOCOL_FEATURES: (Empty(), 0),
    Request.SET_PROTOCOL_FEATURES: (U64(1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK), 0),
    Request.GET_QUEUE_NUM: (Empty(), 0),
    Request.SET_VRING_ENABLE: (VringState(0, 1), 0),
    Request.SEND_RARP: (U64(int.from_bytes(MAC + bytes(2), "little")), 0),
    Request.NET_SET_MTU: (U64(1500), 0),
    Request.SET_BACKEND_REQ_FD: (Empty(), 1),
    Request.IOTLB_MSG: (IotlbMsg(0x1000, 0x1000, 0x7F00_0000_1000, 3, 2), 0),
    Request.SET_VRING_ENDIAN: (VringState(0, 0), 0),
    Request.GET_CONFIG: (DeviceConfig(0, 6, 0, bytes(6)), 0),
    Request.SET_CONFIG: (DeviceConfig(0, 6, 0, MAC), 0),
    Request.CREATE_CRYPTO_SESSION: (Raw(bytes(range(20))), 0),
    Request.CLOSE_CRYPTO_SESSION: (U64(3), 0),
    Request.POSTCOPY_ADVISE: (Empty(), 0),
    Request.POSTCOPY_LISTEN: (Empty(), 0),
    Request.POSTCOPY_END: (Empty(), 0),
    Request.GET_INFLIGHT_FD: (InflightDescriptor(0, 0, 2, 256), 0),
    Request.SET_INFLIGHT_FD: (InflightDescriptor(0x4000, 0, 2, 256), 1),
    Request.GPU_SET_SOCKET: (Empty(), 1),
    Request.RESET_DEVICE: (Empty(), 0),
    Request.VRING_KICK: (VringState(0, 0), 0),
    Request.GET_MAX_MEM_SLOTS: (Empty(), 0),
    Request.ADD_MEM_REG: (SingleMemoryRegion(REGION), 1),
    Request.REM_MEM_REG: (SingleMemoryRegion(REGION), 0),
    Request.SET_STATUS: (U64(0xF), 0),
    Request.GET_STATUS: (Empty(), 0),
    Request.GET_SHARED_OBJECT: (Raw(bytes(range(16))), 0),
    Request.SET_DEVICE_STATE_FD: (Raw(struct.pack("=II", 0, 0)), 1),
    Request.CHECK_DEVICE_STATE: (Empty(), 0),
}

# One well-formed reply for each request that always gets one: payload and fds.
REPLIES: dict[Request, tuple[Payload, int]] = {
    Request.GET_FEATURES: (U64(0x1_4000_0000), 0),
    Request.SET_LOG_BASE: (U64(0), 0),
    Request.GET_VRING_BASE: (VringState(1, 4242), 0),
    Request.GET_PROTOCOL_FEATURES: (U64(0x1_8000), 0),
    Request.GET_QUEUE_NUM: (U64(4), 0),
    Request.IOTLB_MSG: (U64(0), 0),
    Request.GET_CONFIG: (DeviceConfig(0, 6, 0, MAC), 0),
    Request.CREATE_CRYPTO_SESSION: (Raw(struct.pack("=q", 5)), 0),
    Request.POSTCOPY_ADVISE: (Empty(), 1),
    Request.POSTCOPY_END: (U64(0), 0),
    Request.GET_INFLIGHT_FD: (InflightDescriptor(0x4000, 0, 2, 256), 1),
    Request.GET_MAX_MEM_SLOTS: (U64(509), 0),
    Request.GET_STATUS: (U64(0xF), 0),
    Request.GET_SHARED_OBJECT: (U64(0), 1),
    Request.SET_DEVICE_STATE_FD: (U64(1 << 8), 0),
    Request.CHECK_DEVICE_STATE: (U64(0), 0),
}


# --- layouts ------------------------------------------------------------------------------------------------


def test_every_request_has_a_spec_and_a_sample() -> None:
    assert set(REQUESTS) == set(Request) == set(SAMPLES)
    assert [r.value for r in Request] == list(range(1, 44))


def test_payload_sizes_match_the_spec() -> None:
    assert HEADER.size == 12
    assert len(U64(1).pack()) == 8
    assert len(VringState(0, 0).pack()) == 8
    assert len(VringAddr(0, 0, 0, 0, 0, 0).pack()) == 40
    assert len(VringFile(0).pack()) == 8
    assert len(REGION.pack()) == 32
    assert len(MemoryTable(()).pack()) == 8
    assert len(MemoryTable((REGION,) * 8).pack()) == 8 + 8 * 32
    assert len(SingleMemoryRegion(REGION).pack()) == 40
    assert len(LogDescriptor(0, 0).pack()) == 16
    assert len(DeviceConfig(0, 10, 0, bytes(10)).pack()) == 12 + 10
    assert len(InflightDescriptor(0, 0, 0, 0).pack()) == 24
    assert len(IotlbMsg(0, 0, 0, 0, 0).pack()) == 32


def test_fields_sit_where_the_spec_puts_them() -> None:
    addr = VringAddr(1, 2, 3, 4, 5, 6).pack()
    assert struct.unpack("=IIQQQQ", addr) == (1, 2, 3, 4, 5, 6)
    table = MemoryTable((MemoryRegion(1, 2, 3, 4),)).pack()
    assert struct.unpack("=IIQQQQ", table) == (1, 0, 1, 2, 3, 4)
    single = SingleMemoryRegion(MemoryRegion(1, 2, 3, 4)).pack()
    assert struct.unpack("=QQQQQ", single) == (0, 1, 2, 3, 4)
    assert struct.unpack("=Q", VringFile(3, nofd=True).pack()) == (0x103,)
    assert struct.unpack("=III", DeviceConfig(4, 2, 1, b"ab").pack()[:12]) == (4, 2, 1)


@given(
    st.one_of(
        st.builds(U64, U64S),
        st.builds(VringState, U32, U32),
        st.builds(VringAddr, U32, U32, U64S, U64S, U64S, U64S),
        st.builds(VringFile, st.integers(0, 255), st.booleans()),
        st.builds(
            MemoryTable, st.lists(st.builds(MemoryRegion, U64S, U64S, U64S, U64S), max_size=8).map(tuple)
        ),
        st.builds(SingleMemoryRegion, st.builds(MemoryRegion, U64S, U64S, U64S, U64S)),
        st.builds(LogDescriptor, U64S, U64S),
        st.binary(max_size=VHOST_USER_MAX_CONFIG_SIZE).flatmap(
            lambda data: st.builds(DeviceConfig, U32, st.just(len(data)), U32, st.just(data))
        ),
        st.builds(InflightDescriptor, U64S, U64S, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
        st.builds(IotlbMsg, U64S, U64S, U64S, st.integers(0, 255), st.integers(0, 255)),
        st.builds(Raw, st.binary(max_size=64)),
        st.just(Empty()),
    )
)
def test_payload_unpack_inverts_pack(payload: Payload) -> None:
    assert type(payload).unpack(payload.pack()) == payload


def test_payload_constructors_refuse_what_cannot_be_sent() -> None:
    with pytest.raises(PayloadError, match="VHOST_USER_VRING_IDX_MASK"):
        VringFile(256)
    with pytest.raises(PayloadError, match="VHOST_MEMORY_BASELINE_NREGIONS"):
        MemoryTable((REGION,) * (VHOST_MEMORY_BASELINE_NREGIONS + 1))
    with pytest.raises(PayloadError, match="VHOST_USER_MAX_CONFIG_SIZE"):
        DeviceConfig(0, 257, 0, bytes(257))
    with pytest.raises(PayloadError, match="4 bytes of data"):
        DeviceConfig(0, 6, 0, bytes(4))


def test_always_replies_follows_the_spec() -> None:
    getters = {r for r in Request if r.name.startswith("GET_")}
    assert getters <= {r for r in Request if always_replies(r)}
    assert always_replies(Request.SET_LOG_BASE)
    assert not always_replies(Request.SET_MEM_TABLE)
    assert not always_replies(Request.SET_VRING_KICK)
    assert {r for r in Request if always_replies(r)} == set(REPLIES)


# --- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", list(Request), ids=lambda r: r.name)
@pytest.mark.parametrize("need_reply", [False, True])
def test_every_request_round_trips_with_its_fds(request_: Request, need_reply: bool) -> None:
    payload, nfds = SAMPLES[request_]
    with no_fd_leak():
        fds = eventfds(nfds)
        backend = BackendConnection()
        backend.receive_data(FrontendConnection.request(request_, payload, need_reply=need_reply), fds)
        msg = backend.next_event()
        assert isinstance(msg, Message)
        assert msg.request is request_
        assert msg.payload == payload
        assert msg.fds == fds
        assert msg.need_reply is need_reply
        assert msg.flags == VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        assert backend.next_event() is NEED_DATA
        close_all(msg.fds)


def test_rem_mem_reg_accepts_the_fd_old_front_ends_send() -> None:
    with no_fd_leak():
        (fd,) = eventfds(1)
        backend = BackendConnection()
        backend.receive_data(
            FrontendConnection.request(Request.REM_MEM_REG, SingleMemoryRegion(REGION)), [fd]
        )
        msg = backend.next_event()
        assert isinstance(msg, Message) and msg.fds == (fd,)
        os.close(fd)


@pytest.mark.parametrize("request_", list(REPLIES), ids=lambda r: r.name)
def test_every_reply_round_trips(request_: Request) -> None:
    payload, nfds = REPLIES[request_]
    with no_fd_leak():
        fds = eventfds(nfds)
        frontend = FrontendConnection()
        frontend.receive_data(BackendConnection.reply(request_, payload), fds)
        msg = frontend.next_event()
        assert isinstance(msg, Message)
        assert (msg.request, msg.payload, msg.fds) == (request_, payload, fds)
        assert msg.flags == VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
        close_all(msg.fds)


def test_reply_and_ack_bytes() -> None:
    assert reply(Request.GET_FEATURES, U64(5)) == HEADER.pack(1, 0x5, 8) + struct.pack("=Q", 5)
    assert ack(Request.SET_MEM_TABLE, ok=True) == HEADER.pack(5, 0x5, 8) + struct.pack("=Q", 0)
    failure = ack(Request.SET_MEM_TABLE, ok=False)
    assert HEADER.unpack_from(failure) == (5, 0x5, 8)
    assert struct.unpack_from("=Q", failure, 12)[0] != 0


def test_front_end_reads_acks_and_empty_replies() -> None:
    frontend = FrontendConnection()
    frontend.receive_data(ack(Request.SET_MEM_TABLE, ok=False) + reply(Request.GET_CONFIG, Empty()))
    nack, empty = drain(frontend)
    assert (nack.request, nack.payload) == (Request.SET_MEM_TABLE, U64(1))
    assert (empty.request, empty.payload) == (Request.GET_CONFIG, Empty())


def test_front_end_refuses_a_payload_of_the_wrong_kind() -> None:
    with pytest.raises(TypeError, match="SET_VRING_NUM carries VringState"):
        FrontendConnection.request(Request.SET_VRING_NUM, U64(256))


def test_front_end_rejects_a_reply_without_the_reply_flag() -> None:
    frontend = FrontendConnection()
    frontend.receive_data(encode(Request.GET_FEATURES, VHOST_USER_VERSION, U64(1).pack()) + reply(1, U64(2)))
    with pytest.raises(ProtocolError, match="VHOST_USER_REPLY_MASK"):
        frontend.next_event()
    assert [m.payload for m in drain(frontend)] == [U64(2)]


# --- byte stream splits and fd attribution ------------------------------------------------------------------

STREAM = [
    (r, SAMPLES[r][1])
    for r in (
        Request.GET_FEATURES,
        Request.SET_VRING_ERR,
        Request.SET_MEM_TABLE,
        Request.SET_VRING_NUM,
        Request.SET_VRING_KICK,
        Request.ADD_MEM_REG,
        Request.GET_CONFIG,
    )
]


def stream_bytes() -> list[bytes]:
    return [FrontendConnection.request(r, SAMPLES[r][0]) for r, _ in STREAM]


@given(st.data())
def test_any_split_that_a_stream_socket_can_produce_gives_the_same_messages(data: st.DataObject) -> None:
    """Chunks may end anywhere, except that a chunk carrying fds ends inside the message sent with them (the
    kernel stops a read after data carrying fds); the fds come with the chunk holding the message's start."""
    wire = stream_bytes()
    starts = [sum(map(len, wire[:i])) for i in range(len(wire))]
    total = sum(map(len, wire))
    cuts = set(data.draw(st.lists(st.integers(1, total - 1), max_size=40)))
    cuts |= {starts[i] + len(wire[i]) for i, (_, n) in enumerate(STREAM) if n}
    bounds = [0, *sorted(c for c in cuts if c < total), total]
    blob = b"".join(wire)
    with no_fd_leak():
        sent = [eventfds(n) for _, n in STREAM]
        backend = BackendConnection()
        got: list[Message] = []
        for lo, hi in itertools.pairwise(bounds):
            fds = [fd for i, s in enumerate(starts) if lo <= s < hi for fd in sent[i]]
            backend.receive_data(blob[lo:hi], fds)
            got += drain(backend)
        assert [(m.request, m.payload, m.fds) for m in got] == [
            (r, SAMPLES[r][0], fds) for (r, _), fds in zip(STREAM, sent, strict=True)
        ]
        for m in got:
            close_all(m.fds)


def test_fds_belong_to_the_message_holding_the_last_byte_of_their_chunk() -> None:
    first, second, third = stream_bytes()[:3]
    with no_fd_leak():
        call_fd, *mem_fds = eventfds(3)
        backend = BackendConnection()
        # One read returns GET_FEATURES and the head of SET_VRING_ERR, with SET_VRING_ERR's fd.
        backend.receive_data(first + second[:5], [call_fd])
        backend.receive_data(second[5:])
        # The next read holds SET_MEM_TABLE whole and ends with it: its fds are its own.
        backend.receive_data(third, mem_fds)
        a, b, c = drain(backend)
        assert (a.fds, b.fds, c.fds) == ((), (call_fd,), tuple(mem_fds))
        close_all((call_fd, *mem_fds))


def test_fds_with_an_empty_chunk_belong_to_the_next_message() -> None:
    with no_fd_leak():
        (fd,) = eventfds(1)
        backend = BackendConnection()
        backend.receive_data(b"", [fd])
        backend.receive_data(FrontendConnection.request(Request.SET_LOG_FD))
        (msg,) = drain(backend)
        assert msg.fds == (fd,)
        os.close(fd)


def test_close_releases_the_fds_of_an_incomplete_message() -> None:
    with no_fd_leak():
        fds = eventfds(2)
        wire = FrontendConnection.request(Request.SET_MEM_TABLE, SAMPLES[Request.SET_MEM_TABLE][0])
        backend = BackendConnection()
        backend.receive_data(wire[:20], fds)
        assert backend.next_event() is NEED_DATA
        backend.close()
        assert not any(is_open(fd) for fd in fds)


# --- malformed messages -------------------------------------------------------------------------------------

GOOD = FrontendConnection.request(Request.SET_VRING_NUM, VringState(0, 256))


def expect_skipped(wire: bytes, nfds: int, match: str) -> ProtocolError:
    """Feed a malformed message then a good one: the first raises, its fds are closed, the second parses."""
    with no_fd_leak():
        fds = eventfds(nfds)
        backend = BackendConnection()
        backend.receive_data(wire, fds)
        backend.receive_data(GOOD)
        with pytest.raises(ProtocolError, match=match) as info:
            backend.next_event()
        assert not info.value.fatal
        assert not any(is_open(fd) for fd in fds)
        (msg,) = drain(backend)
        assert (msg.request, msg.payload) == (Request.SET_VRING_NUM, VringState(0, 256))
    return info.value


def test_bad_version_is_skipped() -> None:
    e = expect_skipped(encode(Request.SET_FEATURES, 0x2, U64(1).pack()), 0, "version 2")
    assert e.request is Request.SET_FEATURES


def test_unknown_request_code_is_skipped_with_its_code() -> None:
    e = expect_skipped(encode(99, VHOST_USER_VERSION | VHOST_USER_NEED_REPLY_MASK, bytes(8)), 1, "unknown")
    assert (e.request, e.code, e.need_reply) == (None, 99, True)
    assert "request code 99" in str(e)


def test_short_payload_is_skipped() -> None:
    wire = encode(Request.SET_VRING_ADDR, VHOST_USER_VERSION, VringAddr(0, 0, 1, 2, 3, 4).pack()[:-1])
    e = expect_skipped(wire, 0, "39 bytes, expected 40")
    assert e.request is Request.SET_VRING_ADDR


def test_long_payload_is_skipped() -> None:
    expect_skipped(encode(Request.GET_FEATURES, VHOST_USER_VERSION, bytes(8)), 0, "8 bytes, expected 0")


def test_memory_table_size_must_match_nregions() -> None:
    body = MemoryTable((REGION, REGION)).pack()[:-32]
    expect_skipped(encode(Request.SET_MEM_TABLE, VHOST_USER_VERSION, body), 2, "expected 72")


def test_memory_table_with_more_than_eight_regions_is_skipped() -> None:
    body = struct.pack("=II", 9, 0) + REGION.pack() * 9
    expect_skipped(encode(Request.SET_MEM_TABLE, VHOST_USER_VERSION, body), MAX_FDS, "nregions 9")


def test_config_larger_than_the_config_space_limit_is_skipped() -> None:
    body = struct.pack("=III", 0, 300, 0) + bytes(300)
    expect_skipped(encode(Request.SET_CONFIG, VHOST_USER_VERSION, body), 0, "VHOST_USER_MAX_CONFIG_SIZE")


def test_vring_file_with_reserved_bits_is_skipped() -> None:
    wire = encode(Request.SET_VRING_KICK, VHOST_USER_VERSION, U64(1 << 9 | 1).pack())
    expect_skipped(wire, 1, "reserved bits")


def test_extra_fds_are_closed_and_the_message_skipped() -> None:
    wire = FrontendConnection.request(Request.SET_VRING_CALL, VringFile(0))
    e = expect_skipped(wire, 2, "2 fds attached, expected 1")
    assert e.request is Request.SET_VRING_CALL


def test_fd_on_a_request_that_takes_none_is_closed() -> None:
    expect_skipped(FrontendConnection.request(Request.SET_FEATURES, U64(0)), 1, "1 fds attached, expected 0")


def test_missing_fds_are_reported() -> None:
    table = SAMPLES[Request.SET_MEM_TABLE][0]
    expect_skipped(FrontendConnection.request(Request.SET_MEM_TABLE, table), 1, "1 fds attached, expected 2")
    expect_skipped(FrontendConnection.request(Request.SET_VRING_KICK, VringFile(0)), 0, "0 fds")


def test_nofd_kick_with_an_fd_is_skipped() -> None:
    wire = FrontendConnection.request(Request.SET_VRING_KICK, VringFile(0, nofd=True))
    expect_skipped(wire, 1, "1 fds attached, expected 0")


def test_oversize_payload_breaks_the_connection_for_good() -> None:
    with no_fd_leak():
        fds = eventfds(1)
        backend = BackendConnection()
        # Only the header has arrived: the size alone condemns the stream.
        backend.receive_data(HEADER.pack(Request.SET_FEATURES, 0x9, VHOST_USER_MAX_PAYLOAD_SIZE + 1), fds)
        with pytest.raises(ProtocolError, match="exceeds VHOST_USER_MAX_PAYLOAD_SIZE") as info:
            backend.next_event()
        assert info.value.fatal and info.value.need_reply
        assert info.value.request is Request.SET_FEATURES
        assert not is_open(fds[0])
        late = eventfds(1)
        backend.receive_data(GOOD, late)
        assert not is_open(late[0])
        with pytest.raises(ProtocolError) as again:
            backend.next_event()
        assert again.value is info.value


def test_largest_accepted_payload_size_is_not_fatal() -> None:
    e = expect_skipped(
        encode(Request.GET_FEATURES, VHOST_USER_VERSION, bytes(VHOST_USER_MAX_PAYLOAD_SIZE)), 0, "expected 0"
    )
    assert not e.fatal


@given(st.binary(min_size=12, max_size=64))
def test_garbage_raises_protocol_errors_only(garbage: bytes) -> None:
    backend = BackendConnection()
    backend.receive_data(garbage)
    for _ in range(len(garbage)):
        try:
            if backend.next_event() is NEED_DATA:
                break
        except ProtocolError as e:
            if e.fatal:
                break


# --- a QEMU-like start over a real socket -------------------------------------------------------------------


def memfd(size: int) -> int:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    return fd


def qemu_start() -> list[tuple[Request, Payload, tuple[int, ...], bool]]:
    """What QEMU's vhost-user-net sends when a guest with one queue pair starts (hw/virtio/vhost-user.c)."""
    low, high = memfd(0xA0000), memfd(0x10000)
    table = MemoryTable(
        (
            MemoryRegion(0, 0xA0000, 0x7F00_0000_0000, 0),
            MemoryRegion(0x10_0000, 0x10000, 0x7F00_0010_0000, 0),
        )
    )
    proto = U64(
        1 << ProtocolFeature.MQ
        | 1 << ProtocolFeature.LOG_SHMFD
        | 1 << ProtocolFeature.REPLY_ACK
        | 1 << ProtocolFeature.BACKEND_REQ
        | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    )
    seq: list[tuple[Request, Payload, tuple[int, ...], bool]] = [
        (Request.GET_FEATURES, Empty(), (), False),
        (Request.GET_PROTOCOL_FEATURES, Empty(), (), False),
        (Request.SET_PROTOCOL_FEATURES, proto, (), False),
        (Request.GET_QUEUE_NUM, Empty(), (), False),
        (Request.GET_MAX_MEM_SLOTS, Empty(), (), False),
        (Request.SET_BACKEND_REQ_FD, Empty(), eventfds(1), True),
        (Request.SET_OWNER, Empty(), (), False),
        (Request.GET_FEATURES, Empty(), (), False),
        (Request.SET_VRING_CALL, VringFile(0), eventfds(1), False),
        (Request.SET_VRING_CALL, VringFile(1), eventfds(1), False),
        (Request.SET_FEATURES, U64(1 << 32 | 1 << VHOST_USER_F_PROTOCOL_FEATURES), (), False),
        (Request.SET_MEM_TABLE, table, (low, high), True),
    ]
    for q in (0, 1):
        seq += [
            (Request.SET_VRING_NUM, VringState(q, 256), (), False),
            (Request.SET_VRING_BASE, VringState(q, 0), (), False),
            (
                Request.SET_VRING_ADDR,
                VringAddr(q, 0, 0x7F00_0000_0000, 0x7F00_0000_2000, 0x7F00_0000_1000, 0),
                (),
                False,
            ),
            (Request.SET_VRING_KICK, VringFile(q), eventfds(1), False),
            (Request.SET_VRING_CALL, VringFile(q), eventfds(1), False),
        ]
    seq += [(Request.SET_VRING_ENABLE, VringState(q, 1), (), True) for q in (0, 1)]
    seq.append((Request.GET_VRING_BASE, VringState(0, 0), (), False))
    return seq


@pytest.mark.parametrize("read_size", [7, 12, 64, 65536])
def test_qemu_like_sequence_over_a_socketpair(read_size: int) -> None:
    with no_fd_leak():
        seq = qemu_start()
        frontend_sock, backend_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with frontend_sock, backend_sock:
            for req, payload, fds, need_reply in seq:
                data = FrontendConnection.request(req, payload, need_reply=need_reply)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
                frontend_sock.sendmsg([data], anc)
            frontend_sock.shutdown(socket.SHUT_WR)
            sent_inodes = [tuple(os.fstat(fd).st_ino for fd in fds) for _, _, fds, _ in seq]
            for _, _, fds, _ in seq:
                close_all(fds)  # the back-end now holds its own copies
            backend = BackendConnection()
            got: list[Message] = []
            space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
            while True:
                data, ancdata, _, _ = backend_sock.recvmsg(read_size, space)
                if not data:
                    break
                fds_in = array.array("i")
                for level, kind, blob in ancdata:
                    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                    fds_in.frombytes(blob[: len(blob) - len(blob) % fds_in.itemsize])
                backend.receive_data(data, list(fds_in))
                got += drain(backend)
        assert [(m.request, m.payload, m.need_reply) for m in got] == [(r, p, nr) for r, p, _, nr in seq]
        assert [tuple(os.fstat(fd).st_ino for fd in m.fds) for m in got] == sent_inodes
        for m in got:
            close_all(m.fds)
