"""An independent, deliberately plain reference of CONTRACT §6: total credited and total
held mWh per register stream. Slow on purpose; written from the contract text (and the
decisions recorded in docs/metering.md), not from agent/ledger/metering.py. No time, no
intervals: only how much energy each stream credits and holds (times only where rule 6
needs them: the grid meter's step across a reboot).

Contract v2 (processing version m2): §6.0 the baseline credit first − r and §6.3's parts
pass rule 6 (r is read as a reading at up = 0 of its boot: first − r is an ordinary step
from it, held and level shift included; r(b') − mark(b) against max power × the cross-boot
window; without r, first(b') − mark(b) against the time between the two readings), the
grid meter's mark in b' is max(mark(b), first(b')), and a spoiled source (§6.9) is
omitted (the messages come here as metering reads them: agent.ledger.inputs.raw_msg).

Decisions it shares with the real implementation (docs/metering.md):
- r(b) of a slot: the boot event's `restored` (lowest-seq boot event) when it names the
  slot, else `b_mwh` of the lowest-seq telemetry of the boot that carries it.
- Rule 6: a reading equal to the mark refreshes the uptime the power limit counts from.
- A meter serial change across a reboot is a swap like any other: new baseline, no credit.
- A meter_reset event before any meter reading starts the baseline at `to_wh`.
- A cross-boot jump held without r: the mark stays mark(b) and the held reading is
  pending (confirmed as a level shift by the next reading), both timed at its uptime.
"""

from __future__ import annotations

from typing import Any


def reference_totals(
    msgs: list[Any],
    max_power_w_slot: int = 3000,
    max_power_w_meter: int = 50_000,
    cross_boot_window_ms: int = 900_000,
) -> dict[tuple[str, int], tuple[int, int]]:
    """{(sid, slot): (credited mWh, held mWh)} for slot 0 (meter) and every slot."""
    # one copy per key
    unique = {}
    for m in msgs:
        unique.setdefault((m.sid, m.boot, m.seq), m)
    result: dict[tuple[str, int], tuple[int, int]] = {}
    for sid in sorted({k[0] for k in unique}):
        keys = sorted(k for k in unique if k[0] == sid)
        station = [unique[k] for k in keys]
        restored = restored_values(station)
        offsets = boot_offsets(station)
        # every stream's items in (boot, seq) order
        streams: dict[int, list[dict[str, Any]]] = {}
        for m in station:
            b = m.body
            if b.get("ev") == "meter_reset":
                streams.setdefault(0, []).append(
                    {
                        "what": "reset",
                        "boot": m.boot,
                        "up": b["up"],
                        "from": b["from_wh"] * 1000,
                        "to": b["to_wh"] * 1000,
                        "sn": b.get("sn"),
                        "t": b["up"] + offsets[m.boot],
                    }
                )
            elif "ev" not in b:
                if "meter" in b and "e_wh" in b["meter"]:
                    streams.setdefault(0, []).append(
                        {
                            "what": "reading",
                            "boot": m.boot,
                            "up": b["up"],
                            "value": b["meter"]["e_wh"] * 1000,
                            "sn": b["meter"].get("sn"),
                            "t": b["up"] + offsets[m.boot],
                        }
                    )
                seen = set()
                for s in b.get("slots", []):
                    if s["n"] in seen:
                        continue
                    seen.add(s["n"])
                    streams.setdefault(s["n"], []).append(
                        {
                            "what": "reading",
                            "boot": m.boot,
                            "up": b["up"],
                            "value": s["e_mwh"],
                            "sn": None,
                            "t": b["up"] + offsets[m.boot],
                        }
                    )
        for slot, items in streams.items():
            limit_w = max_power_w_meter if slot == 0 else max_power_w_slot
            result[(sid, slot)] = walk(items, slot, restored, limit_w, cross_boot_window_ms)
    return result


def boot_offsets(station: list[Any]) -> dict[int, int]:
    """Rule 5: each boot's offset: ts − up of its lowest-seq message with ts, else the
    smallest receive time − up over its messages."""
    out: dict[int, int] = {}
    synced: set[int] = set()
    for m in station:  # (boot, seq) order
        b = m.body
        if m.boot in synced:
            continue
        if "ts" in b:
            out[m.boot] = b["ts"] - b["up"]
            synced.add(m.boot)
        else:
            e = m.recv_ms - b["up"]
            out[m.boot] = min(out.get(m.boot, e), e)
    # an unsynced boot takes the smallest estimate over all its messages
    for m in station:
        if m.boot not in synced:
            out[m.boot] = min(out[m.boot], m.recv_ms - m.body["up"])
    return out


def restored_values(station: list[Any]) -> dict[tuple[int, int], int]:
    """{(boot, slot): r} following the order of preference above."""
    r: dict[tuple[int, int], int] = {}
    from_event: set[tuple[int, int]] = set()
    boots_with_event: set[int] = set()
    for m in station:  # in (boot, seq) order: the first one found is the lowest seq
        b = m.body
        if b.get("ev") == "boot" and m.boot not in boots_with_event:
            boots_with_event.add(m.boot)
            for k, v in b.get("restored", {}).items():
                r[(m.boot, int(k))] = v
                from_event.add((m.boot, int(k)))
    for m in station:
        b = m.body
        if "ev" in b:
            continue
        for s in b.get("slots", []):
            if "b_mwh" in s and (m.boot, s["n"]) not in r:
                r[(m.boot, s["n"])] = s["b_mwh"]
    return r


def walk(
    items: list[dict[str, Any]],
    slot: int,
    restored: dict[tuple[int, int], int],
    limit_w: int,
    window_ms: int = 900_000,
) -> tuple[int, int]:
    credited = 0
    held = 0
    started = False
    mark = 0
    mark_up = 0
    boot = None
    sn = None
    last_t = 0
    pending = None  # (value, up) of a held reading waiting for the next one

    def limit(elapsed_ms: int) -> int:
        return limit_w * max(0, elapsed_ms) // 3600

    def step(value: int, up: int) -> None:
        """A reading after another of its boot (rules 2 and 6)."""
        nonlocal credited, held, mark, mark_up, pending
        if pending is not None:
            p_value, p_up = pending
            pending = None
            too_far = value - mark > limit(up - mark_up)
            plausible_from_held = value - p_value <= limit(up - p_up)
            if too_far and plausible_from_held:
                mark = p_value
                mark_up = p_up
        gain = value - mark
        if gain > 0 and gain > limit(up - mark_up):
            held += gain
            pending = (value, up)
        elif gain >= 0:
            credited += gain
            mark = value
            mark_up = up

    def first_after_restore(r: int, value: int, up: int) -> None:
        nonlocal mark, mark_up
        mark = r
        mark_up = 0
        step(value, up)
        if value < r:  # below the restored value: the boot's mark starts at first (rule 3)
            mark = value
            mark_up = up

    for it in items:
        if it["what"] == "reset":
            if started:
                credited += max(0, it["from"] - mark)
            started = True
            mark = it["to"]
            mark_up = it["up"]
            pending = None
            sn = it["sn"]
            boot = it["boot"]
            last_t = it["t"]
            continue

        value = it["value"]
        up = it["up"]
        r = restored.get((it["boot"], slot)) if slot != 0 else None
        if not started:
            started = True
            pending = None
            if r is not None:
                # r is a reading at up = 0 of this boot: the first is a step from it
                first_after_restore(r, value, up)
            else:
                mark = value
                mark_up = up
        elif it["sn"] is not None and sn is not None and it["sn"] != sn:
            mark = value
            mark_up = up
            pending = None
        elif it["boot"] != boot:
            pending = None
            if r is not None:
                p = max(0, r - mark)
                if p > limit(window_ms):
                    held += p
                else:
                    credited += p
                first_after_restore(r, value, up)
            else:
                c = max(0, value - mark)
                if c > limit(it["t"] - last_t):
                    held += c
                    pending = (value, up)
                    mark_up = up
                else:
                    credited += c
                    mark = max(mark, value) if slot == 0 else value
                    mark_up = up
        else:
            step(value, up)
        if it["sn"] is not None:
            sn = it["sn"]
        boot = it["boot"]
        last_t = it["t"]
    return credited, held
