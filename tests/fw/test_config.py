import json

import config
from fwtest import raises, tmpdir


def good():
    return config.example()


def test_example_is_valid_and_defaults_filled():
    cfg = config.validate(good())
    assert cfg["sid"] == "KH-PNH-0001"
    assert cfg["bus"]["retries"] == 1
    assert cfg["net"] == {"kind": "host"}
    assert len(config.key_bytes(cfg)) == 32


def test_missing_key_named():
    for k in ("sid", "key", "slots", "broker", "sample_ms", "ntp"):
        c = good()
        del c[k]
        e = raises(config.ConfigError, config.validate, c)
        assert e.key == k and e.why == "missing", (k, e.key)


def test_missing_nested_key_named():
    c = good()
    del c["broker"]["host"]
    assert raises(config.ConfigError, config.validate, c).key == "broker.host"
    c = good()
    del c["bus"]["uart"]
    assert raises(config.ConfigError, config.validate, c).key == "bus.uart"


def test_unknown_key_named():
    c = good()
    c["colour"] = "red"
    e = raises(config.ConfigError, config.validate, c)
    assert e.key == "colour" and e.why == "unknown key"
    c = good()
    c["bus"]["speed"] = 9600
    assert raises(config.ConfigError, config.validate, c).key == "bus.speed"


def test_malformed_values_named():
    cases = [
        ("sid", "kh-pnh-0001"),
        ("sid", "AB"),
        ("kid", "1"),
        ("key", "AB" * 32),
        ("key", "00" * 31),
        ("slots", 0),
        ("slots", 17),
        ("slots", True),
        ("sample_ms", 1.5),
        ("ntp", 5),
    ]
    for k, v in cases:
        c = good()
        c[k] = v
        assert raises(config.ConfigError, config.validate, c).key == k, (k, v)


def test_net_kind_and_its_keys():
    c = good()
    c["net"] = {"kind": "wifi", "ssid": "station"}
    assert config.validate(c)["net"]["password"] == ""
    c["net"] = {"kind": "wifi"}
    assert raises(config.ConfigError, config.validate, c).key == "net.ssid"
    c["net"] = {"kind": "carrier-pigeon"}
    assert raises(config.ConfigError, config.validate, c).key == "net.kind"


def test_meter_may_be_null():
    c = good()
    c["meter"] = None
    assert config.validate(c)["meter"] is None


def test_broker_user_must_be_sid():
    c = good()
    c["broker"]["user"] = "OTHER-STATION"
    assert raises(config.ConfigError, config.validate, c).key == "broker.user"


def test_load_from_file_and_bad_json():
    d = tmpdir("cfg")
    with open(d + "/config.json", "w") as f:
        f.write(json.dumps(good()))
    assert config.load(d + "/config.json")["slots"] == 8
    with open(d + "/bad.json", "w") as f:
        f.write("{not json")
    assert raises(config.ConfigError, config.load, d + "/bad.json").key == "config.json"
    assert raises(config.ConfigError, config.load, d + "/absent.json").key == "config.json"
