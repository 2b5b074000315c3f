"""Commissioning reports: one JSON file (for machines) and one text file (for people) per
board and attempt, in the reports folder, named `<sid>-<UTC time>.{json,txt}`. Failed
attempts get a report too (result "failed", the stage and the reason). Reports never hold
the station key or the broker password (the config in them is redacted); the sha256 of
config.json is there, which reveals nothing about the key.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

REPORT_VERSION = 1


def utc_stamp(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def iso(ms: int) -> str:
    t = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def write(folder: str | pathlib.Path, rep: dict[str, Any]) -> tuple[pathlib.Path, pathlib.Path]:
    d = pathlib.Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    base = f"{rep['sid']}-{utc_stamp(int(rep['started_ms']))}"
    n = 0
    while (d / f"{base}.json").exists():  # two attempts within a second
        n += 1
        base = f"{rep['sid']}-{utc_stamp(int(rep['started_ms']))}-{n}"
    j = d / f"{base}.json"
    t = d / f"{base}.txt"
    j.write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    t.write_text(text(rep))
    return j, t


def text(rep: dict[str, Any]) -> str:
    """The report for people: what was done to the board, what it answered, the verdict."""
    lines = [
        f"Commissioning report: station {rep['sid']}",
        f"result:    {rep['result'].upper()}"
        + (f" at {rep['stage']}: {rep['error']}" if rep.get("error") else ""),
    ]
    lines.append(f"started:   {iso(int(rep['started_ms']))}  ({rep.get('elapsed_s', '?')} s)")
    lines.append(f"operator:  {rep.get('operator', '?')}  tool {rep.get('tool', '?')}")
    lines.append(f"port:      {rep.get('port') or '-'}")
    b = rep.get("board")
    if b:
        lines.append(
            f"board:     {b['chip']} MicroPython {b['micropython']} (mpy {b['mpy']}, "
            f"arch {b['arch'] or 'none'}) id {b['unique_id'] or '-'}"
        )
    img = rep.get("image")
    if img:
        lines.append(
            f"image:     {img['size']} bytes at {hex(img['offset'])} sha256 {img['sha256'][:16]}… "
            f"chip {img['chip']} MAC {img['mac'] or '-'}{' (flash erased first)' if img['erased'] else ''}"
        )
    a = rep.get("agent")
    if a:
        if a.get("answered"):
            lines.append(
                f"agent:     {a['url']}: {'known' if a['known'] else 'new'} station, "
                f"kids {a['kids'] or '-'}, highest boot {a['max_boot']}"
            )
        else:
            lines.append(f"agent:     not asked ({a.get('why')})")
    if "kid" in rep:
        lines.append(
            f"identity:  kid {rep['kid']}, boot_base {rep['boot_base']}, "
            f"key {rep.get('key_registered', 'not registered')}"
        )
    b = rep.get("broker")
    if b:
        lines.append(
            f"broker:    {b['user']} at {b['host']}:{b['port']} over TLS, CA pinned: "
            f"sha256 {b['ca_sha256']} ({b['dir']})"
        )
    elif rep.get("broker_user"):
        lines.append(f"broker:    {rep['broker_user']}")
    fw = rep.get("firmware")
    if fw:
        lines.append(
            f"firmware:  {fw['version']} build {fw['build']} march {fw['march'] or 'none'}, "
            f"{len(rep.get('files', {}))} files, {fw['bytes']} bytes "
            f"({fw.get('written', 0)} written, {fw.get('unchanged', 0)} unchanged)"
        )
    if rep.get("deploy"):
        rom = (rep.get("board") or {}).get("romfs")
        part = (
            "no ROMFS support"
            if rom is None
            else "no ROMFS partition"
            if not rom.get("partitions")
            else f"ROMFS partition {rom['size']} bytes"
        )
        lines.append(
            f"deploy:    {rep['deploy']} ({rep.get('deploy_why', '')})"
            + (f"; board: {part}" if rep.get("board") and rep["deploy"] != "romfs" else "")
        )
    img = rep.get("romfs")
    if img:
        lines.append(
            f"romfs:     image {img['size']} bytes, {len(img['files'])} files, sha256 "
            f"{img['sha256']} ({'written' if img.get('written') else 'already on the board'})"
        )
    hp = rep.get("heap")
    if hp:
        if "free" in hp:
            lines.append(
                f"heap:      {hp['free']} bytes free, {hp['alloc']} in use after importing the "
                f"station's modules (app from {hp['app_from']})"
            )
        else:
            lines.append(f"heap:      {hp.get('error')}")
    if rep.get("removed"):
        lines.append(f"removed:   {', '.join(rep['removed'])}")
    v = rep.get("verify")
    if v:
        if v["ok"]:
            lines.append(
                f"verify:    all {v['files']} files match (sha256 on the board)"
                + (
                    ", the ROMFS partition holds the image (sha256 read back)"
                    if v.get("romfs_sha256")
                    else ""
                )
            )
        else:
            lines.append(f"verify:    MISMATCH {', '.join(v['mismatch'])}")
    st = rep.get("selftest")
    if st:
        lines.append(
            f"self-test: {'PASS' if st.get('ok') else 'FAIL'}"
            + (f" in {st['ms']} ms" if "ms" in st else "")
        )
        for name, c in sorted(st.get("checks", {}).items()):
            lines.append(f"  {'ok  ' if c.get('ok') else 'FAIL'} {name:8} {c.get('detail', '')}")
    if rep.get("clock_skew_ms") is not None:
        lines.append(f"clock:     board - host = {rep['clock_skew_ms']} ms (approximate)")
    if rep.get("start"):
        lines.append(f"start:     {rep['start']}")
    for r in rep.get("rollback", []):
        lines.append(f"rollback:  {r}")
    files = rep.get("files")
    if files:
        lines.append("files (sha256):")
        for p, h in sorted(files.items()):
            lines.append(f"  {h}  {p}")
    cfg = rep.get("config")
    if cfg:
        lines.append("config.json (key and passwords redacted):")
        lines.append("  " + json.dumps(cfg, sort_keys=True))
    return "\n".join(lines) + "\n"
