"""The dashboard in headless Chromium against a running demo (3 stations × 4 slots of real
firmware on MicroPython, the rigs, Mosquitto, the agent): the fleet page lists every
station, a station page shows a power change within 3 s, an offline station raises an
alarm that clears when it returns. Screenshots go to artifacts/dashboard/.

Needs the Debian packages chromium and chromium-driver (`WITH_BROWSER=1 make setup`).
In CI a missing browser fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import json
import pathlib
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser import ARTIFACTS, chromium, need_browser
from tools.demo import Demo, DemoConfig

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    need_browser()
    # accel 4: simulated days (the fleet sets the stations' clocks ahead), and still a rider
    # only every 5 min per station, so the test's own changes are the changes it sees
    d = Demo(
        DemoConfig(
            stations=3,
            slots=4,
            accel=4.0,
            port=0,
            telemetry_s=1,
            workdir=tmp_path_factory.mktemp("demo"),
            fresh=True,
        )
    )
    d.start()
    try:
        wait(
            lambda: (
                len(
                    [
                        s
                        for s in api(d, "api/fleet")["stations"]
                        if s["state"] == "online" and s["power_w"] is not None
                    ]
                )
                == 3
            ),
            60,
            "three stations online",
        )
        yield d
    finally:
        d.stop()
    assert d.summary["integrity"] == "ok" and d.summary["raw"] > 0


@pytest.fixture(scope="module")
def browser(demo: Demo) -> Iterator[Any]:
    with chromium("1280,1200") as drv:
        yield drv


def api(d: Demo, path: str) -> Any:
    with urllib.request.urlopen(d.url + path, timeout=10) as r:
        return json.load(r)


def wait(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            v = pred()
        except Exception:  # noqa: BLE001  (an element mid-redraw, a busy server)
            v = None
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def shot(drv: Any, name: str) -> None:
    drv.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def no_script_errors(drv: Any) -> None:
    """Nothing went wrong in the page's JavaScript (an exception, a failed fetch)."""
    bad = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
    assert not bad, bad


def js(drv: Any, script: str) -> Any:
    return drv.execute_script(script)


def test_fleet_page_lists_every_station(demo: Demo, browser: Any) -> None:
    browser.get(demo.url)
    assert demo.fleet is not None
    # the stations, then the demo's simulated OCPP chargers (docs/ocpp.md)
    assert demo.ocpp_fleet is not None
    sids = [st.sid for st in demo.fleet.stations] + demo.ocpp_fleet.sids
    rows = wait(
        lambda: (
            js(
                browser,
                "return [...document.querySelectorAll('tr[data-sid]')]"
                ".map(r => [r.dataset.sid, r.className])",
            )
            or None
        ),
        20,
        "station rows",
    )
    assert [r[0] for r in rows] == sids
    wait(
        lambda: all(
            c == "state-online"
            for _, c in js(
                browser,
                "return [...document.querySelectorAll('tr[data-sid]')]"
                ".map(r => [r.dataset.sid, r.className])",
            )
        ),
        20,
        "all online",
    )
    assert "live" in browser.find_element("id", "conn").get_attribute("class")
    # the charts have drawn (SVG), and the page title bar links the other pages
    wait(
        lambda: js(browser, "return document.querySelectorAll('#chart-power svg path').length"),
        20,
        "power chart",
    )
    shot(browser, "fleet")
    browser.set_window_size(390, 1400)  # a phone
    time.sleep(1.5)
    shot(browser, "fleet-phone")
    browser.set_window_size(1280, 1200)
    no_script_errors(browser)


def test_station_page_shows_a_power_change_within_3s(demo: Demo, browser: Any) -> None:
    assert demo.fleet is not None
    st = demo.fleet.stations[0]

    def charging() -> list[int]:  # after the charger's handshake and soft start
        detail = api(demo, f"api/stations/{st.sid}")
        return [s["n"] for s in detail["slot_list"] if (s["power_w"] or 0) > 300]

    n = wait(charging, 90, f"a slot charging at {st.sid}", every=0.5)[0]
    browser.get(f"{demo.url}stations/{st.sid}")
    sel = f"#slots .slot[data-slot='{n}'] .power"
    before = int(
        wait(
            lambda: js(browser, f'return document.querySelector("{sel}").dataset.value'),
            20,
            "the slot's power",
        )
    )
    assert before > 100
    shot(browser, "station-before")
    with st.lock:  # the battery is taken out: the charger's output drops to 0 W
        bat = st.rig.remove(n)
        t0 = time.monotonic()
    try:
        wait(
            lambda: js(browser, f'return document.querySelector("{sel}").dataset.value') == "0",
            15,
            "0 W on the page",
        )
        took = time.monotonic() - t0
        shot(browser, "station-after")
    finally:
        if bat is not None:
            with st.lock:
                st.rig.insert(n, battery=bat, power_w=1000.0)
    no_script_errors(browser)
    print(f"power change on the page {took:.2f} s after the rig's change")
    assert took < 3.0, f"the page showed the change after {took:.2f} s"


def test_offline_alarm_appears_and_clears(demo: Demo, browser: Any) -> None:
    assert demo.fleet is not None
    sid = demo.fleet.stations[1].sid
    browser.get(demo.url)
    sel = f"#alarms li[data-alarm-id='{sid}:offline']"
    wait(
        lambda: js(browser, "return document.querySelectorAll('tr[data-sid]').length") == 5,
        20,
        "fleet page",
    )
    assert not js(browser, f'return document.querySelector("{sel}")')
    demo.fleet.offline(sid)  # SIGTERM: the broker publishes the station's last will
    try:
        wait(
            lambda: js(browser, f'return document.querySelector("{sel}")'), 30, "the offline alarm"
        )
        assert (
            js(browser, f"return document.querySelector(\"tr[data-sid='{sid}']\").className")
            == "state-offline"
        )
        assert "crit" in js(browser, f'return document.querySelector("{sel}").className')
        shot(browser, "alarm-offline")
    finally:
        demo.fleet.online(sid)
    wait(
        lambda: not js(browser, f'return document.querySelector("{sel}")'), 60, "the alarm to clear"
    )
    assert (
        js(browser, f"return document.querySelector(\"tr[data-sid='{sid}']\").className")
        == "state-online"
    )
    shot(browser, "alarm-cleared")
    # the alarms page keeps the story
    browser.get(demo.url + "alarms")
    text = wait(lambda: browser.find_element("id", "events").text, 20, "events")
    assert "raised:offline" in text or "cleared:offline" in text
    shot(browser, "alarms")
    no_script_errors(browser)
    assert pathlib.Path(ARTIFACTS / "alarm-offline.png").stat().st_size > 10_000
