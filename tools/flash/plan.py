"""What goes onto a board: the station's config.json (CONTRACT §9) and the compiled firmware.

Pure logic apart from reading files: the site template and overrides are merged, the
station's identity (sid, kid, key, boot_base, broker user and password) is set, and the
result is checked with the firmware's own validator (firmware/config.py, the code the board
runs at start), so a config the board would refuse is refused here, with the key's name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pathlib
import re
from typing import Any

from agent.wire import check_sid as wire_check_sid
from tools import fwbuild
from tools.flash.errors import BadInput
from tools.fwbuild import firmware_module

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
FIRMWARE = ROOT / "firmware"
REDACTED = "<redacted>"
IDENTITY = ("sid", "kid", "key", "boot_base")  # set by the tool, never by a site file

# Hardware defaults for an ESP32 station board: UART ids (pins at the port's defaults unless
# the site says otherwise) and the firmware's default periods. The site file gives the
# rest (broker, network, slots) and may override anything here.
DEFAULTS: dict[str, Any] = {
    "broker": {"tls": False, "prefix": "stations"},
    "charger": {"uart": 1, "baud": 115200, "timeout_ms": 200},
    "bus": {"uart": 2, "baud": 9600, "parity": None, "stop": 1, "timeout_ms": 100, "retries": 1},
    "meter": {"unit": 1, "model": "sdm630"},
    "bms": {"unit_base": 10, "per_cycle": 2},
    "sample_ms": 1000,
    "telemetry_s": 10,
    "stale_s": 5,
    "persist": {"every_mwh": 10000, "every_s": 60},
    "outbox": {"max_bytes": 262144},
    "ntp": "pool.ntp.org",
}


def check_sid(sid: str) -> str:
    try:
        return wire_check_sid(sid)
    except ValueError as e:
        raise BadInput("check", str(e)) from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: objects merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """A command-line or CSV value: JSON when it parses (numbers, true, null, objects), else
    the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def set_dotted(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise BadInput("check", f"bad config key {key!r}")
    if parts[0] in IDENTITY or key in ("broker.user", "broker.password"):
        raise BadInput("check", f"{key} is set by the flashing tool, not by the site")
    node = cfg
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` items (dotted keys) -> an override tree."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            raise BadInput("check", f"--set {item!r}: want KEY=VALUE")
        set_dotted(out, key.strip(), parse_value(val))
    return out


def load_site(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise BadInput("check", f"cannot read site file {path}: {e.strerror}") from None
    except ValueError as e:
        raise BadInput("check", f"site file {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInput("check", f"site file {path}: want a JSON object")
    for k in IDENTITY:
        if k in data:
            raise BadInput("check", f"site file {path}: {k} is set by the flashing tool")
    return data


def station_config(
    site: dict[str, Any], *, sid: str, kid: int, key: bytes, boot_base: int, password: str
) -> dict[str, Any]:
    """The station's full config, validated by the firmware's own rules (BadInput naming the
    key when they refuse it). Unknown keys are refused as the board would refuse them."""
    cfg = merge(DEFAULTS, site)
    cfg.update({"sid": sid, "kid": kid, "key": key.hex(), "boot_base": boot_base})
    broker = cfg.setdefault("broker", {})
    if not isinstance(broker, dict):
        raise BadInput("check", "config: broker: must be an object")
    broker["user"] = sid
    broker["password"] = password
    fwconfig = firmware_module("config")
    try:
        fwconfig.validate(copy.deepcopy(cfg))
    except fwconfig.ConfigError as e:
        hint = ""
        if e.why == "missing" and e.key in ("broker.host", "broker.port", "net", "slots"):
            hint = " (give it in the site file, --set, or --broker/--slots)"
        elif e.key == "broker.ca":
            hint = " (give --broker-dir DIR, the directory `stationctl broker init` wrote)"
        raise BadInput("check", str(e) + hint) from None
    return cfg


def config_bytes(cfg: dict[str, Any]) -> bytes:
    return json.dumps(cfg, separators=(",", ":"), sort_keys=True).encode()


def redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as it may be shown: no key, no broker password."""
    out = copy.deepcopy(cfg)
    if "key" in out:
        out["key"] = REDACTED
    b = out.get("broker")
    if isinstance(b, dict) and b.get("password"):
        b["password"] = REDACTED
    net = out.get("net")
    if isinstance(net, dict) and net.get("password"):
        net["password"] = REDACTED
    return out


def firmware_files(march: str | None) -> dict[str, bytes]:
    """The compiled firmware (every module as .mpy for the board's mpy version, main.py as
    source), "/"-separated paths relative to the flash root."""
    out = fwbuild.build(march=march)
    files: dict[str, bytes] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            files[p.relative_to(out).as_posix()] = p.read_bytes()
    return files


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fw_version() -> str:
    m = re.search(r'^FW_VERSION = "([^"]+)"', (FIRMWARE / "app.py").read_text(), re.M)
    return m.group(1) if m else "?"


def board_boot(state_files: list[bytes]) -> int | None:
    """The boot counter the board persisted (firmware persist.py A/B slots), None if none."""
    persist = firmware_module("persist")
    best: tuple[int, Any] | None = None
    for data in state_files:
        r = persist.decode(data)
        if r is not None and (best is None or r[0] > best[0]):
            best = r
    if best is None or not isinstance(best[1], dict) or type(best[1].get("boot")) is not int:
        return None
    return int(best[1]["boot"])
