"""Configuration from flags and TOML: what is accepted, and the errors users see."""

import pytest

from vhostmap.config import ConfigError, build_config, format_mac, parse_mac, parse_port_flag


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
