"""The dashboard's history features in headless Chromium, on a dashboard (login off, loopback)
over an agent database filled from a simulated fleet (tests/test_dashboard_features.py):
the fleet filtered by text and by state and sorted by a column (kept in the URL), the
energy page marking an incomplete day, the range picker changing the URL, CSV downloads
equal to the rows shown, the sessions page, the alarm history with an acknowledgement, and
the "example parameters, not validated" mark. Screenshots go to artifacts/dashboard/.

Needs the Debian packages chromium and chromium-driver (`WITH_BROWSER=1 make setup`).
In CI a missing browser fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import csv
import io
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dashboard.history import NOT_VALIDATED
from agent.dashboard.users import UserStore
from tests.browser import chromium, need_browser
from tests.test_dashboard_features import D26, D27, D28, GAP_SID, Served, make_fleet_db
from tests.test_demo_browser import (
    js,
    no_script_errors,
    shot,
    wait,
)

pytestmark = pytest.mark.timeout(120)
SIDS = [f"KH-TST-{i:04d}" for i in range(3)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    need_browser()
    tmp = tmp_path_factory.mktemp("features-browser")
    UserStore.open(tmp / "users.db", create=True).close()
    s = Served(make_fleet_db(tmp / "agent.db"), tmp / "users.db")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser(server: Served) -> Iterator[Any]:
    with chromium("1280,1100") as drv:
        yield drv


def fetch_link(drv: Any, selector: str) -> tuple[str, list[list[str]]]:
    """(the link's URL, the CSV rows it gives), fetched by the page itself."""
    href = js(drv, f"return document.querySelector('{selector}').href")
    text = drv.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(r => r.text()).then(done, e => done('ERROR ' + e));",
        href,
    )
    assert not text.startswith("ERROR"), text
    return href, list(csv.reader(io.StringIO(text)))


def url_query(drv: Any) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(drv.current_url).query))


def shown(drv: Any, table: str, attr: str = "sid") -> list[str]:
    return list(
        js(
            drv,
            f"return [...document.querySelectorAll('#{table} tbody tr[data-{attr}]')].map(r => r.dataset.{attr})",
        )
    )


def visible_text(drv: Any, selector: str) -> str | None:
    """The text of an element that is displayed (read in one go: live pages redraw)."""
    return js(  # type: ignore[no-any-return]
        drv,
        f"const e = document.querySelector('{selector}');"
        "return e && e.offsetParent !== null && e.getBoundingClientRect().height > 0 ? e.textContent : null",
    )


def test_fleet_filter_state_sort_and_csv(server: Served, browser: Any) -> None:
    browser.get(server.origin + "/")
    wait(lambda: shown(browser, "stations") == SIDS, 15, "three stations")
    box = browser.find_element("id", "st-filter")
    box.send_keys("tst-0001")
    wait(lambda: shown(browser, "stations") == ["KH-TST-0001"], 5, "filtered by text")
    assert url_query(browser)["q"] == "tst-0001"
    _, rows = fetch_link(browser, "#csv")
    assert [r[0] for r in rows[1:]] == ["KH-TST-0001"]
    box.clear()
    js(browser, "document.getElementById('st-filter').dispatchEvent(new Event('input'))")
    from selenium.webdriver.support.ui import Select

    state = Select(browser.find_element("id", "st-state"))
    state.select_by_value("online")
    wait(lambda: shown(browser, "stations") == [], 5, "no station online")
    assert "No station matches" in browser.find_element("id", "stations").text
    state.select_by_value("silent")
    wait(lambda: shown(browser, "stations") == SIDS, 5, "all silent")
    assert url_query(browser)["state"] == "silent"
    # sort by today's energy, then the other way
    th = browser.find_element("css selector", "#stations th[data-sort='today']")
    th.click()
    th.click()
    assert url_query(browser)["sort"] == "today" and url_query(browser)["dir"] == "desc"
    today = [
        int(v)
        for v in js(
            browser,
            "return [...document.querySelectorAll('#stations td[data-field=today]')].map(t => t.dataset.value)",
        )
    ]
    assert today == sorted(today, reverse=True) and today[0] > today[-1]
    order = shown(browser, "stations")
    href, rows = fetch_link(browser, "#csv")
    assert "format=csv" in href and "sort=today" in href and "dir=desc" in href
    assert rows[0][0] == "station" and [r[0] for r in rows[1:]] == order
    # the view is in the URL: a reload shows the same
    browser.refresh()
    wait(lambda: shown(browser, "stations") == order, 10, "the same view after a reload")
    mark = wait(lambda: visible_text(browser, "#totals .carbon-mark"), 10, "the mark")
    assert NOT_VALIDATED in mark and "example-kh v2026.1" in mark
    shot(browser, "features-fleet-filtered")
    no_script_errors(browser)


def test_energy_page_marks_an_incomplete_day_and_the_picker_sets_the_url(
    server: Served, browser: Any
) -> None:
    browser.get(f"{server.origin}/energy?from={D26}&to={D28}")
    wait(lambda: len(shown(browser, "days", "day")) == 9, 15, "nine station-days")
    complete = js(
        browser,
        "return Object.fromEntries([...document.querySelectorAll('#days tbody tr')]"
        ".map(r => [r.dataset.sid + ' ' + r.dataset.day, r.dataset.complete]))",
    )
    assert complete[f"{GAP_SID} {D27}"] == "false"
    assert complete[f"KH-TST-0000 {D27}"] == "true" and complete[f"KH-TST-0002 {D27}"] == "true"
    assert all(complete[f"{s} {D28}"] == "false" for s in SIDS)  # today
    row = browser.find_element("css selector", f"#days tr[data-sid='{GAP_SID}'][data-day='{D27}']")
    assert "incomplete" in row.get_attribute("class") and "incomplete" in row.text
    assert row.find_element("css selector", "[data-field=intervals]").text.endswith("/96")
    # the chart marks every day some station has incomplete (the 27th: the gap)
    assert js(browser, "return document.querySelectorAll('#chart-days g.flagged').length") == 3
    mark = browser.find_element("css selector", "#en-cards .carbon-mark")
    assert mark.is_displayed() and NOT_VALIDATED in mark.text
    shot(browser, "features-energy")
    # the CSV link gives the rows shown
    _, rows = fetch_link(browser, "#csv")
    table = js(
        browser,
        "return [...document.querySelectorAll('#days tbody tr')].map(r => [r.dataset.sid, r.dataset.day,"
        " r.querySelector('[data-field=intervals]').textContent, r.dataset.complete === 'true' ? 'yes' : 'no'])",
    )
    assert [[r[0], r[1], r[4], r[5]] for r in rows[1:]] == table
    # a preset of the picker: the URL says the new range, the rows follow it
    browser.find_element("css selector", "#range button[data-preset='7d']").click()
    wait(lambda: url_query(browser).get("from") == "2025-11-22", 5, "the URL's new range")
    assert url_query(browser)["to"] == D28
    wait(
        lambda: js(browser, "return document.getElementById('range-from').value") == "2025-11-22",
        5,
        "picker",
    )
    assert len(shown(browser, "days", "day")) == 3 * 7
    href, rows = fetch_link(browser, "#csv")
    assert "from=2025-11-22" in href and len(rows) == 1 + 3 * 7
    # a date typed into the picker
    js(
        browser,
        f"const f = document.getElementById('range-from'); f.value = '{D27}';"
        "f.dispatchEvent(new Event('change', {bubbles: true}));",
    )
    wait(lambda: url_query(browser).get("from") == D27, 5, "the typed date in the URL")
    wait(lambda: len(shown(browser, "days", "day")) == 3 * 2, 5, "two days")
    no_script_errors(browser)


def test_sessions_page_lists_sessions_and_downloads_them(server: Served, browser: Any) -> None:
    browser.get(f"{server.origin}/sessions?from={D26}&to={D28}")
    wait(lambda: len(shown(browser, "sessions")) == 3, 15, "three sessions")
    assert browser.find_element("id", "pager-count").text == "1–3 of 3"
    table = js(
        browser,
        "return [...document.querySelectorAll('#sessions tbody tr')].map(r => [r.dataset.sid, r.dataset.slot, r.dataset.start])",
    )
    starts = [t[2] for t in table]
    assert starts == sorted(starts, reverse=True)
    href, rows = fetch_link(browser, "#csv")
    assert f"from={D26}" in href
    assert rows[0][:4] == ["station", "slot", "battery", "start_utc"]
    assert [[r[0], r[1], r[3]] for r in rows[1:]] == table
    shot(browser, "features-sessions")
    # one station, chosen from the select: in the URL too
    from selenium.webdriver.support.ui import Select

    Select(
        wait(
            lambda: (
                browser.find_element("css selector", "#sid option[value='KH-TST-0002']")
                and browser.find_element("id", "sid")
            ),
            10,
            "stations",
        )
    ).select_by_value("KH-TST-0002")
    wait(lambda: shown(browser, "sessions") == ["KH-TST-0002"], 5, "one station's sessions")
    assert url_query(browser)["sid"] == "KH-TST-0002"
    no_script_errors(browser)
    # a bad date in the URL: the page says why
    browser.get(f"{server.origin}/sessions?from=2025-13-01")
    err = wait(lambda: browser.find_element("id", "load-error").text, 10, "the error")
    assert "from must be a date" in err
    browser.get_log("browser")  # that 400: expected


def test_alarm_history_shows_who_acknowledged(server: Served, browser: Any) -> None:
    browser.get(server.origin + "/alarms")
    wait(lambda: len(shown(browser, "history", "id")) >= 3, 15, "the history")
    # the live list is redrawn every few seconds: find the button and click it at once
    sel = f"#alarms li[data-alarm-id='{GAP_SID}:offline'] button.ack"
    wait(
        lambda: js(
            browser, f'const b = document.querySelector("{sel}"); if (b) b.click(); return !!b'
        ),
        15,
        "the Acknowledge button",
    )
    by = wait(
        lambda: js(
            browser,
            f"return document.querySelector(\"#history tr[data-id='{GAP_SID}:offline'] .acked-by\")?.dataset.ackedBy",
        ),
        10,
        "acknowledged in the history",
    )
    assert by == "local@127.0.0.1"
    row = browser.find_element("css selector", f"#history tr[data-id='{GAP_SID}:offline']")
    assert "active" in row.text and "offline" in row.text
    shot(browser, "features-alarms-history")
    # the station page's CO2e carries the mark too
    browser.get(f"{server.origin}/stations/{GAP_SID}")
    mark = wait(lambda: visible_text(browser, "#st-cards .carbon-mark"), 10, "the mark")
    assert NOT_VALIDATED in mark
    no_script_errors(browser)
