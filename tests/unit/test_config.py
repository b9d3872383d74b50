"""Configuration from flags and TOML: what is accepted, and the errors users see."""

import grp

import pytest

from vhostmap.daemon.config import ConfigError, build_config, parse_mac, parse_port_flag
from vhostmap.ethernet import format_mac
from vhostmap.system.privileges import lookup
from vhostmap.vhost_user.device import ALL_OFFLOADS, OFFLOADS


def test_port_flag_with_every_option() -> None:
    p = parse_port_flag(
        "vm0=vhost-user,path=/run/vhostmap/vm0.sock,mode=client,queues=4,mac=52:54:00:00:00:10,mtu=9000"
    )
    assert (p.name, p.type, p.path, p.mode, p.queues, p.mtu) == (
        "vm0",
        "vhost-user",
        "/run/vhostmap/vm0.sock",
        "client",
        4,
        9000,
    )
    assert p.mac == bytes.fromhex("525400000010")


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("vm0", "expected NAME=TYPE"),
        ("vm0=tap,path=/x", "unknown type 'tap'"),
        ("vm0=vhost-user", "path= (the vhost-user socket) is required"),
        ("vm0=vhost-user,path=/x,mode=both", "mode must be server or client"),
        ("vm0=vhost-user,path=/x,queues=0", "queues must be 1..64"),
        ("vm0=vhost-user,path=/x,queues=four", "queues must be a number"),
        ("vm0=vhost-user,path=/x,mac=52:54", "bad MAC address"),
        ("vm0=vhost-user,path=/x,speed=10", "unknown option 'speed'"),
        ("vm0=vhost-user,path=/x,mtu", "is not key=value"),
        ("vm 0=vhost-user,path=/x", "names are 1-32 characters"),
        ("vm0=vhost-user,path=/" + "x" * 120, "longer than the 107 bytes"),
    ],
)
def test_bad_port_flags_say_what_is_wrong(flag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_port_flag(flag)


def test_toml_and_flags_merge() -> None:
    toml = {
        "ports": {"vm0": {"type": "vhost-user", "path": "/tmp/a.sock", "queues": 2}},
        "links": [{"ports": ["vm0", "vm1"]}],
        "control_socket": "/tmp/ctl.sock",
    }
    cfg = build_config(toml, ["vm1=vhost-user,path=/tmp/b.sock"])
    assert [p.name for p in cfg.ports] == ["vm0", "vm1"]
    assert cfg.port("vm0").queues == 2
    assert cfg.links == (("vm0", "vm1"),)
    assert cfg.control_socket == "/tmp/ctl.sock"


@pytest.mark.parametrize(
    ("ports", "links", "message"),
    [
        (["a=vhost-user,path=/1", "a=vhost-user,path=/2"], [], "port 'a' is defined twice"),
        (["a=vhost-user,path=/1", "b=vhost-user,path=/1"], [], "used by two ports"),
        (["a=vhost-user,path=/1"], ["a,b"], "no port named 'b'"),
        (["a=vhost-user,path=/1"], ["a,a"], "already linked|to itself"),
        (
            ["a=vhost-user,path=/1", "b=vhost-user,path=/2", "c=vhost-user,path=/3"],
            ["a,b", "a,c"],
            "already linked",
        ),
        (["a=vhost-user,path=/1"], ["a"], "expected two port names"),
    ],
)
def test_inconsistent_configs_are_refused(ports: list[str], links: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(None, ports, links)


def test_unknown_toml_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown configuration key 'switchez'"):
        build_config({"switchez": {}})


def test_mac_round_trip() -> None:
    assert format_mac(parse_mac("52:54:00:AB:cd:0f")) == "52:54:00:ab:cd:0f"


# --- switches, host rings, generic ports --------------------------------------------------------------------
def test_switches_from_flags_and_toml() -> None:
    toml = {
        "ports": {
            "vm0": {"path": "/tmp/a.sock", "host": "tap-vm0"},
            "uplink": {"type": "generic", "ifname": "veth0"},
        },
        "switches": {"vale0": {"ports": ["vm0", "uplink"], "aging": 60}},
    }
    cfg = build_config(
        toml, ["vm1=vhost-user,path=/tmp/b.sock"], switch_flags=["vale1=vm1,aging=5.5", "vale2="]
    )
    assert [(s.name, s.ports, s.aging) for s in cfg.switches] == [
        ("vale0", ("vm0", "uplink"), 60.0),
        ("vale1", ("vm1",), 5.5),
        ("vale2", (), 300.0),
    ]
    assert cfg.port("vm0").host == "tap-vm0"
    up = cfg.port("uplink")
    assert (up.type, up.ifname, up.path) == ("generic", "veth0", "")
    assert parse_port_flag("up=generic,ifname=veth0,host=tap0").host == "tap0"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("up=generic", "ifname= (the interface to attach) is required"),
        ("up=generic,ifname=veth0,path=/x", "path= is for vhost-user ports"),
        ("up=generic,ifname=veth0,queues=2", "a generic port has one queue"),
        ("up=generic,ifname=a/b", "ifname must be an interface name"),
        ("up=generic,ifname=" + "v" * 16, "ifname must be an interface name"),
        ("vm0=vhost-user,path=/x,ifname=veth0", "ifname= is for generic ports"),
        ("vm0=vhost-user,path=/x,host=a b", "host= must be an interface name"),
    ],
)
def test_bad_generic_and_host_options_say_what_is_wrong(flag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_port_flag(flag)


@pytest.mark.parametrize(
    ("ports", "links", "switches", "message"),
    [
        (["a=vhost-user,path=/1"], [], ["vale0=a,b"], "switch 'vale0': no port named 'b'"),
        (["a=vhost-user,path=/1"], [], ["vale0=a,a"], "port 'a' is listed twice"),
        (["a=vhost-user,path=/1"], [], ["vale0=a", "vale1=a"], "already on switch 'vale0'"),
        (["a=vhost-user,path=/1"], [], ["vale0=", "vale0="], "switch 'vale0' is defined twice"),
        (["a=vhost-user,path=/1", "b=vhost-user,path=/2"], ["a,b"], ["vale0=a"], "already linked"),
        (["a=vhost-user,path=/1"], [], ["vale0=a,aging=0"], "aging must be"),
        (["a=vhost-user,path=/1"], [], ["vale0=a,aging=soon"], "aging must be a number"),
        (["a=vhost-user,path=/1"], [], ["vale0=a,speed=1"], "unknown option 'speed'"),
        (["a=vhost-user,path=/1"], [], ["vale0=a,,"], "empty port name"),
        (["a=vhost-user,path=/1"], [], ["vale0"], "expected NAME=PORT"),
        (["a=vhost-user,path=/1"], [], ["vale 0=a"], "names are 1-32 characters"),
        (
            ["a=vhost-user,path=/1,host=tap0", "b=vhost-user,path=/2"],
            ["a,b"],
            [],
            "host= cannot be combined with a link",
        ),
        (["a=vhost-user,path=/1,host=t0", "b=vhost-user,path=/2,host=t0"], [], [], "TAP t0 is used by two"),
        (["a=generic,ifname=v0", "b=generic,ifname=v0"], [], [], "interface v0 is used by two ports"),
        (["a=generic,ifname=v0", "b=vhost-user,path=/2,host=v0"], [], [], "both a host= TAP and"),
    ],
)
def test_inconsistent_switch_configs_are_refused(
    ports: list[str], links: list[str], switches: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(None, ports, links, switch_flags=switches)


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        ({"vale0": ["a"]}, "expected a table with ports"),
        ({"vale0": {"ports": "a"}}, "ports must be a list of port names"),
        ({"vale0": {"ports": [], "learn": True}}, "unknown option 'learn'"),
        ({"vale0": {"ports": [], "aging": True}}, "aging must be a number"),
        ([{"ports": []}], r"expected \[switches.NAME\] tables"),
    ],
)
def test_bad_switch_tables_are_refused(switches: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"switches": switches})


def test_socket_owner_applies_to_server_sockets_and_unknown_users_are_refused() -> None:
    cfg = build_config(
        None, ["a=vhost-user,path=/1", "b=vhost-user,path=/2,mode=client"], socket_owner="nobody"
    )
    assert cfg.port("a").owner == "nobody" and cfg.port("a").uid == 65534
    assert cfg.port("b").owner is None
    with pytest.raises(ConfigError, match="no user named 'no-such-user-x'"):
        parse_port_flag("a=vhost-user,path=/1,owner=no-such-user-x")
    with pytest.raises(ConfigError, match="apply to mode=server sockets"):
        parse_port_flag("a=vhost-user,path=/1,mode=client,owner=0")


def test_a_generating_port_takes_a_frame_length() -> None:
    assert parse_port_flag("vm0=vhost-user,path=/x,generate=64").generate == 64
    assert parse_port_flag("vm0=vhost-user,path=/x,mtu=9000,generate=2048").generate == 2048
    # Beyond the MTU: TCP frames with a segmentation offload, up to 64 KiB.
    assert parse_port_flag("vm0=vhost-user,path=/x,generate=1515").generate == 1515
    assert parse_port_flag("vm0=vhost-user,path=/x,generate=65535").generate == 65535
    assert (
        build_config({"ports": {"vm0": {"path": "/x", "generate": 1500}}}, [], []).port("vm0").generate
        == 1500
    )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("vm0=vhost-user,path=/x,generate=59", "generate= is a frame length of 60..1514 bytes"),
        ("vm0=vhost-user,path=/x,generate=65536", r"60..1514 bytes .*, or 1515..65535 for TCP segmentation"),
        ("vm0=vhost-user,path=/x,mtu=9000,generate=2049", r"60..2048 bytes .*, or 9015..65535"),
        ("vm0=vhost-user,path=/x,generate=big", "generate must be a number"),
        ("up=generic,ifname=veth0,generate=64", "generate= is for vhost-user ports"),
        ("vm0=vhost-user,path=/x,generate=64,host=tap0", "generate= and host= both feed"),
    ],
)
def test_bad_generate_options_say_what_is_wrong(flag: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_port_flag(flag)


@pytest.mark.parametrize(("links", "switches"), [(["a,b"], []), ([], ["vale0=a,b"])], ids=["link", "switch"])
def test_a_generating_port_stays_alone(links: list[str], switches: list[str]) -> None:
    ports = ["a=vhost-user,path=/1,generate=64", "b=vhost-user,path=/2"]
    with pytest.raises(ConfigError, match="port 'a': a port with generate= feeds its guest alone"):
        build_config(None, ports, links, switch_flags=switches)


def test_the_user_to_become_is_checked_when_the_config_is_built() -> None:
    port = ["a=vhost-user,path=/tmp/a.sock"]
    assert build_config({"user": "nobody"}, port).user == "nobody"
    assert build_config({"user": "nobody"}, port, user="root:nogroup").user == "root:nogroup"
    with pytest.raises(ConfigError, match="user: no user 'no-such-user'"):
        build_config(None, port, user="no-such-user")
    with pytest.raises(ConfigError, match="user: no group 'no-such-group'"):
        build_config(None, port, user="nobody:no-such-group")


def test_an_identity_names_its_groups() -> None:
    who = lookup("nobody")
    assert (who.name, who.gid) == ("nobody", grp.getgrnam("nogroup").gr_gid)
    assert who.gid in who.groups and lookup(f"{who.uid}:0").gid == 0


@pytest.mark.parametrize(
    "value,offered",
    [
        ("on", ALL_OFFLOADS),
        ("off", 0),
        ("csum", OFFLOADS["csum"]),
        ("csum+tso4+tso6", OFFLOADS["csum"] | OFFLOADS["tso4"] | OFFLOADS["tso6"]),
        ("TSO4+csum+ecn", OFFLOADS["csum"] | OFFLOADS["tso4"] | OFFLOADS["ecn"]),
    ],
)
def test_offloads_are_on_off_or_a_list(value: str, offered: int) -> None:
    assert parse_port_flag(f"a=vhost-user,path=/tmp/a.sock,offloads={value}").offloads == offered


@pytest.mark.parametrize(
    "value,message",
    [
        ("tso4", "needs csum"),
        ("csum+ecn", "ecn needs tso4 or tso6"),
        ("csum+ufo", "unknown offload 'ufo'"),
        ("", "unknown offload ''"),
    ],
)
def test_bad_offload_lists_say_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_port_flag(f"a=vhost-user,path=/tmp/a.sock,offloads={value}")


def test_offloads_from_toml_take_a_list() -> None:
    config = build_config(
        {"ports": {"a": {"type": "vhost-user", "path": "/tmp/a.sock", "offloads": ["csum", "tso6"]}}}, [], []
    )
    assert config.ports[0].offloads == OFFLOADS["csum"] | OFFLOADS["tso6"]
