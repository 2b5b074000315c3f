// The login form: POST /login as JSON (the server sets the session cookie), then back to
// the page that sent us here. Plain JavaScript, no build step.
"use strict";

(function () {
  const form = document.getElementById("login");
  const err = document.getElementById("login-error");
  // only a path of this site: never an absolute URL someone put in the link
  const next = new URLSearchParams(location.search).get("next");
  const target = next && next.startsWith("/") && !next.startsWith("//") ? next : "/";
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    err.hidden = true;
    const body = JSON.stringify({ user: form.user.value, password: form.password.value });
    let r;
    try {
      r = await fetch("/login", { method: "POST", headers: { "Content-Type": "application/json" }, body, credentials: "same-origin" });
    } catch (e) {
      err.textContent = "The dashboard cannot be reached.";
      err.hidden = false;
      return;
    }
    if (r.ok) { location.assign(target); return; }
    let msg = "HTTP " + r.status;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    err.textContent = r.status === 401 ? "Wrong user name or password." : msg;
    err.hidden = false;
    form.password.value = "";
    form.password.focus();
  });
})();
