# Station configuration (CONTRACT §9): config.json at the flash root, validated at start.
# A missing, unknown or malformed key stops the start with its dotted name (ConfigError).
import json


class ConfigError(Exception):
    def __init__(self, key, why):
        super().__init__("config: %s: %s" % (key, why))
        self.key = key
        self.why = why


# CONTRACT §1 ^[A-Z0-9][A-Z0-9-]{2,31}$, character by character: a regex `$` also matches
# before a final newline on CPython, where the flashing tool runs this same check
_SID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
_HEX64 = "0123456789abcdef"
_NOTHING = object()


def _int(lo=None, hi=None):
    def check(v):
        if type(v) is not int:
            return "must be an integer"
        if lo is not None and v < lo:
            return "must be >= %d" % lo
        if hi is not None and v > hi:
            return "must be <= %d" % hi
        return None

    return check


def _str(v):
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _bool(v):
    return None if v is True or v is False else "must be true or false"


def _sid(v):
    if (
        not isinstance(v, str)
        or not 3 <= len(v) <= 32
        or v[0] == "-"
        or any(c not in _SID_CHARS for c in v)
    ):
        return "must match ^[A-Z0-9][A-Z0-9-]{2,31}$"
    return None


def _key(v):
    if not isinstance(v, str) or len(v) != 64 or any(c not in _HEX64 for c in v):
        return "must be 64 lowercase hex characters"
    return None


def _uart(v):
    # a UART id on the ESP32, a device path on the unix port
    if type(v) is int and 0 <= v <= 2:
        return None
    if isinstance(v, str) and v:
        return None
    return "must be a UART id (0..2) or a device path"


def _pin(v):
    return (
        None if v is None or (type(v) is int and 0 <= v <= 48) else "must be a GPIO number or null"
    )


def _parity(v):
    return None if v in (None, 0, 1) else "must be null, 0 (even) or 1 (odd)"


def _host_or_null(v):
    return None if v is None or (isinstance(v, str) and v) else "must be a host name or null"


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
CA_MAX = 6000  # base64 characters: a CA certificate, with room for an RSA-4096 one


def _der_len(der, i):
    """(length, offset of the contents) of the DER element whose tag is at i, or None."""
    if i + 2 > len(der):
        return None
    n = der[i + 1]
    if n < 0x80:
        return n, i + 2
    k = n & 0x7F
    if not 1 <= k <= 2 or i + 2 + k > len(der):
        return None
    n = 0
    for b in der[i + 2 : i + 2 + k]:
        n = n << 8 | b
    return n, i + 2 + k


def ca_der(text):
    """The pinned CA certificate (broker.ca: DER as base64 on one line, i.e. the body of
    its PEM file without the BEGIN/END lines) as bytes; ValueError saying why not.
    Well-formed means: base64 with its padding, and DER holding one SEQUENCE (the
    certificate) that fills it exactly and opens with another (the signed part). The TLS
    library checks the rest when it loads it."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be the CA certificate, DER as base64")
    if text.startswith("-----BEGIN"):
        raise ValueError("must be DER as base64: the PEM body on one line, without -----BEGIN")
    if len(text) > CA_MAX or len(text) % 4 or any(c not in _B64 for c in text.rstrip("=")):
        raise ValueError("is not base64 (one line, padded with =, at most %d characters)" % CA_MAX)
    import binascii

    try:
        der = binascii.a2b_base64(text)
    except Exception:  # binascii.Error on CPython, ValueError on MicroPython
        raise ValueError("is not base64")
    outer = _der_len(der, 0) if der and der[0] == 0x30 else None
    if outer is None or outer[0] + outer[1] != len(der):
        raise ValueError("is not a DER certificate (one SEQUENCE filling it)")
    inner = _der_len(der, outer[1]) if outer[1] < len(der) and der[outer[1]] == 0x30 else None
    if inner is None or inner[0] + inner[1] > len(der):
        raise ValueError("is not a DER certificate (no signed part)")
    return der


def _ca(v):
    if v is None:
        return None  # refused with tls on, by validate()
    try:
        ca_der(v)
    except ValueError as e:
        return str(e)
    return None


# key: (check, default or _NOTHING when required). Nested dicts are their own schemas.
BROKER = {
    "host": (_str, _NOTHING),
    "port": (_int(1, 65535), _NOTHING),
    "tls": (_bool, False),
    "user": (_str, _NOTHING),
    "password": (lambda v: None if isinstance(v, str) else "must be a string", ""),
    "prefix": (_str, "stations"),
    # the broker's CA, pinned (CONTRACT §5; an addition to §9's keys): required with tls
    "ca": (_ca, None),
}
CHARGER = {
    "uart": (_uart, _NOTHING),
    "tx": (_pin, None),
    "rx": (_pin, None),
    "baud": (_int(1200, 1000000), 115200),
    "timeout_ms": (_int(10, 5000), 200),
}
BUS = {
    "uart": (_uart, _NOTHING),
    "tx": (_pin, None),
    "rx": (_pin, None),
    "de": (_pin, None),
    "baud": (_int(1200, 1000000), 9600),
    "parity": (_parity, None),
    "stop": (_int(1, 2), 1),
    "timeout_ms": (_int(10, 5000), 100),
    "retries": (_int(0, 5), 1),
}
METER = {
    "unit": (_int(1, 247), 1),
    "model": (
        lambda v: (
            None
            if v in ("sdm630", "sdm120") or isinstance(v, dict)
            else "must be sdm630, sdm120 or a register map"
        ),
        "sdm630",
    ),
}
BMS = {
    "unit_base": (_int(1, 230), 10),
    "per_cycle": (_int(1, 16), 2),
}
PERSIST = {
    "every_mwh": (_int(1), 10000),
    "every_s": (_int(1), 60),
}
OUTBOX = {"max_bytes": (_int(4096), 262144)}
NET_KINDS = {
    "wifi": {
        "kind": (_str, _NOTHING),
        "ssid": (_str, _NOTHING),
        "password": (lambda v: None if isinstance(v, str) else "must be a string", ""),
    },
    "lan": {"kind": (_str, _NOTHING)},
    "ppp": {
        "kind": (_str, _NOTHING),
        "apn": (_str, _NOTHING),
        "uart": (_uart, 1),
        "tx": (_pin, None),
        "rx": (_pin, None),
        "baud": (_int(1200, 1000000), 115200),
    },
    "host": {"kind": (_str, _NOTHING)},
}
TOP = {
    "sid": (_sid, _NOTHING),
    "kid": (_int(1, 65535), _NOTHING),
    "key": (_key, _NOTHING),
    "boot_base": (_int(0), _NOTHING),
    "broker": (BROKER, _NOTHING),
    "net": (None, _NOTHING),  # schema depends on net.kind
    "slots": (_int(1, 16), _NOTHING),
    "charger": (CHARGER, _NOTHING),
    "bus": (BUS, _NOTHING),
    "meter": (METER, _NOTHING),  # null allowed: no meter
    "bms": (BMS, _NOTHING),
    "sample_ms": (_int(50, 60000), _NOTHING),
    "telemetry_s": (_int(1, 3600), _NOTHING),
    "stale_s": (_int(1, 3600), _NOTHING),
    "persist": (PERSIST, _NOTHING),
    "outbox": (OUTBOX, _NOTHING),
    "ntp": (_host_or_null, _NOTHING),
}
NULLABLE = ("meter",)


def _apply(schema, obj, prefix):
    if not isinstance(obj, dict):
        raise ConfigError(prefix.rstrip("."), "must be an object")
    for k in obj:
        if not isinstance(k, str):  # MicroPython's json.loads lets {"a":"b":5} make key 5
            raise ConfigError(prefix.rstrip(".") or "config.json", "a key is not a string")
        if k not in schema:
            raise ConfigError(prefix + k, "unknown key")
    out = {}
    for k in schema:
        check, default = schema[k]
        name = prefix + k
        if k not in obj:
            if default is _NOTHING:
                raise ConfigError(name, "missing")
            out[k] = default
            continue
        v = obj[k]
        if isinstance(check, dict):
            if v is None and k in NULLABLE:
                out[k] = None
                continue
            out[k] = _apply(check, v, name + ".")
        elif check is None:
            out[k] = v
        else:
            why = check(v)
            if why:
                raise ConfigError(name, why)
            out[k] = v
    return out


def validate(obj):
    """Return the configuration with defaults filled in, or raise ConfigError naming the key."""
    cfg = _apply(TOP, obj, "")
    net = cfg["net"]
    if not isinstance(net, dict):
        raise ConfigError("net", "must be an object")
    kind = net.get("kind")
    if not isinstance(kind, str) or kind not in NET_KINDS:  # a list is unhashable
        raise ConfigError("net.kind", "must be one of wifi, lan, ppp, host")
    cfg["net"] = _apply(NET_KINDS[kind], net, "net.")
    b = cfg["broker"]
    if b["tls"] and b["ca"] is None:
        # no "verify nothing" setting: a station that trusts any certificate sends its
        # password and telemetry to whoever answers on the broker's address
        raise ConfigError("broker.ca", "missing: with tls the broker's CA must be pinned")
    if b["user"] != cfg["sid"]:
        raise ConfigError("broker.user", "must equal sid (the broker ACL keys on it)")
    if cfg["stale_s"] * 1000 < 2 * cfg["sample_ms"]:
        raise ConfigError("stale_s", "must cover at least two sampling periods")
    return cfg


def parse(text):
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ConfigError("config.json", "not valid JSON (%s)" % e)
    except RuntimeError:  # RecursionError on CPython (the flashing tool): too deeply nested
        raise ConfigError("config.json", "nested too deeply")
    return validate(obj)


def load(path="config.json"):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise ConfigError("config.json", "cannot be read at %s" % path)
    except UnicodeError:  # UnicodeDecodeError on CPython
        raise ConfigError("config.json", "not UTF-8 text")
    return parse(text)


def key_bytes(cfg):
    """The 32-byte station key (never logged)."""
    h = cfg["key"]
    return bytes(int(h[i : i + 2], 16) for i in range(0, 64, 2))


def tls_ca(cfg):
    """The pinned CA as DER bytes when the station uses TLS, else None."""
    b = cfg["broker"]
    return ca_der(b["ca"]) if b["tls"] else None


def example(sid="KH-PNH-0001", charger="/dev/ttyUSB0", bus="/dev/ttyUSB1", slots=8):
    """A valid configuration for the unix port (tests, simulators, the demo)."""
    return {
        "sid": sid,
        "kid": 1,
        "key": "00" * 32,
        "boot_base": 0,
        "broker": {
            "host": "127.0.0.1",
            "port": 1883,
            "tls": False,
            "user": sid,
            "password": "",
            "prefix": "stations",
        },
        "net": {"kind": "host"},
        "slots": slots,
        "charger": {"uart": charger, "baud": 115200, "timeout_ms": 200},
        "bus": {
            "uart": bus,
            "baud": 9600,
            "parity": None,
            "stop": 1,
            "timeout_ms": 100,
            "retries": 1,
        },
        "meter": {"unit": 1, "model": "sdm630"},
        "bms": {"unit_base": 10, "per_cycle": 2},
        "sample_ms": 1000,
        "telemetry_s": 10,
        "stale_s": 5,
        "persist": {"every_mwh": 10000, "every_s": 60},
        "outbox": {"max_bytes": 262144},
        "ntp": None,
    }
