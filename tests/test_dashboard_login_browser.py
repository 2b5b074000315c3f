"""Login in headless Chromium against a dashboard (login = "on") over a filled agent
database: an admin logs in, sees the fleet and logs out; a wrong password shows an error;
a viewer gets no Acknowledge button and the server refuses the page's own POST (403); an
operator acknowledges an alarm and the page says by whom. Screenshots go to
artifacts/dashboard/.

Needs the Debian packages chromium and chromium-driver (`WITH_BROWSER=1 make setup`).
In CI a missing browser fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dashboard.auth import Auth
from agent.dashboard.users import UserStore
from tests.browser import ARTIFACTS, chromium, need_browser
from tests.test_dashboard_api import make_db
from tests.test_dashboard_login import PASSWORDS, ROLES, Server
from tests.test_demo_browser import (
    js,
    no_script_errors,
    shot,
    wait,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    need_browser()
    tmp = tmp_path_factory.mktemp("login")
    users = tmp / "users.db"
    with UserStore.open(users, create=True) as st:
        for name, pw in PASSWORDS.items():
            st.add_user(name, ROLES[name], pw)
    for url, *_ in make_db(f"sqlite:///{tmp}/agent.db"):
        s = Server(url, Auth(UserStore.open(users), mode="on"))
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[Any]:
    with chromium("1280,1000") as drv:
        yield drv


def log_in(drv: Any, server: Server, user: str, password: str, path: str = "/") -> None:
    drv.get(server.origin + path)
    wait(lambda: "/login" in drv.current_url, 10, "the login page")
    form = wait(lambda: drv.find_element("id", "login"), 10, "the form")
    drv.find_element("id", "user").clear()
    drv.find_element("id", "user").send_keys(user)
    drv.find_element("id", "password").send_keys(password)
    form.submit()


def log_out(drv: Any) -> None:
    drv.find_element("id", "logout").click()
    wait(lambda: drv.current_url.endswith("/login"), 10, "back on the login page")


def user_bar(drv: Any) -> str:
    return str(js(drv, "return document.querySelector('#userbar:not([hidden])')?.textContent"))


def test_admin_logs_in_sees_the_fleet_and_logs_out(server: Server, browser: Any) -> None:
    log_in(browser, server, "root", PASSWORDS["root"])
    rows = wait(
        lambda: js(
            browser, "return [...document.querySelectorAll('tr[data-sid]')].map(r => r.dataset.sid)"
        ),
        15,
        "station rows",
    )
    assert rows == ["KH-PNH-0001", "KH-PNH-0002"]
    wait(lambda: "root (admin)" in user_bar(browser), 10, "who is logged in")
    shot(browser, "login-fleet-admin")
    log_out(browser)
    # the session is over: the fleet page sends us back to the login page
    browser.get(server.origin + "/")
    wait(lambda: "/login?next=/" in browser.current_url, 10, "the login page again")
    no_script_errors(browser)


def test_a_wrong_password_shows_an_error(server: Server, browser: Any) -> None:
    log_in(browser, server, "ana", "not-her-password")
    err = wait(
        lambda: (
            browser.find_element("id", "login-error").is_displayed()
            and browser.find_element("id", "login-error").text
        ),
        10,
        "the error",
    )
    assert err == "Wrong user name or password."
    assert "/login" in browser.current_url
    shot(browser, "login-wrong-password")
    browser.get_log("browser")  # the 401 of the POST: expected


def test_a_viewer_cannot_acknowledge(server: Server, browser: Any) -> None:
    log_in(browser, server, "vic", PASSWORDS["vic"], "/alarms")
    wait(lambda: browser.current_url.endswith("/alarms"), 10, "the alarms page")
    wait(
        lambda: js(browser, "return document.querySelectorAll('#alarms li[data-alarm-id]').length"),
        15,
        "alarms",
    )
    wait(lambda: "vic (viewer)" in user_bar(browser), 10, "who is logged in")
    assert js(browser, "return document.querySelectorAll('button.ack').length") == 0
    aid = js(browser, "return document.querySelector('#alarms li[data-alarm-id]').dataset.alarmId")
    # the page's own request, with its session and CSRF token: the server says no
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "postJSON('/api/alarms/ack', {id: arguments[0]}).then(r => done(r.status));",
        aid,
    )
    assert status == 403
    browser.get_log("browser")  # that 403: expected
    shot(browser, "login-alarms-viewer")
    log_out(browser)


def test_an_operator_acknowledges_an_alarm(server: Server, browser: Any) -> None:
    log_in(browser, server, "ana", PASSWORDS["ana"], "/alarms")
    button = wait(lambda: browser.find_element("css selector", "#alarms button.ack"), 15, "button")
    assert button.text == "Acknowledge"
    button.click()
    by = wait(
        lambda: js(browser, "return document.querySelector('#alarms .acked')?.dataset.ackedBy"),
        10,
        "acknowledged",
    )
    assert by == "ana"
    shot(browser, "login-alarms-acked")
    # a reload shows it from the server, and no button for it any more
    browser.refresh()
    wait(lambda: js(browser, "return document.querySelector('#alarms .acked')"), 15, "after reload")
    assert pathlib.Path(ARTIFACTS / "login-alarms-acked.png").stat().st_size > 5_000
    log_out(browser)
    no_script_errors(browser)
