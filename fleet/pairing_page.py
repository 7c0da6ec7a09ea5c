"""The technician's phone page: ``/pair`` (HTML), ``/pair/app.js``, ``/pair/app.css``.

Server-rendered, no build step, no third-party code: a form, a few lines of vanilla JS
calling the pairing API, and a progress list the screen reader announces
(``aria-live``). Texts in Swedish and English side by side. Signed in by the session
cookie of an interactive login, or by pasting an API token (kept in ``sessionStorage``,
gone when the tab closes).
"""

from __future__ import annotations

__all__ = ["PAGE_CSP", "PAIR_CSS", "PAIR_HTML", "PAIR_JS"]

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

PAIR_HTML = """<!doctype html>
<html lang="sv">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Parkoppla enhet · Pair a device</title>
<link rel="stylesheet" href="/pair/app.css">
<script src="/pair/app.js" defer></script>
</head>
<body>
<main>
<h1>Parkoppla enhet <span lang="en">· Pair a device</span></h1>

<p id="error" role="alert" class="error" hidden></p>

<details id="signin">
  <summary>Inloggning <span lang="en">· Sign in</span></summary>
  <label for="token">API-nyckel (tekniker) <span lang="en">· API token (technician)</span></label>
  <input id="token" type="password" autocomplete="off" spellcheck="false">
  <p class="hint">Behövs inte om du redan är inloggad.
    <span lang="en">Not needed if you are already signed in.</span></p>
</details>

<form id="find" novalidate>
  <h2>1. Kod <span lang="en">· Code</span></h2>
  <label for="code">Koden som enheten visar
    <span lang="en">· The code the device shows</span></label>
  <input id="code" name="code" required autocomplete="off" autocapitalize="characters"
         spellcheck="false" inputmode="text" maxlength="12" placeholder="BCDF-GHJK">
  <button id="find-button" type="submit">Hämta enheten <span lang="en">· Find device</span></button>
</form>

<form id="pair" novalidate hidden>
  <h2>2. Bekräfta <span lang="en">· Confirm</span></h2>
  <dl>
    <dt>Serienummer <span lang="en">· Serial</span></dt><dd id="serial"></dd>
    <dt>Typ <span lang="en">· Kind</span></dt><dd id="kind"></dd>
    <dt>Programvara <span lang="en">· Firmware</span></dt><dd id="firmware"></dd>
  </dl>
  <label class="check"><input id="serial-ok" type="checkbox" required>
    <span>Serienumret stämmer med etiketten
      <span lang="en">· The serial matches the label</span></span></label>
  <label for="resident">Brukare (pseudonym) <span lang="en">· Resident (pseudonym)</span></label>
  <input id="resident" name="resident" required autocomplete="off" spellcheck="false"
         pattern="[A-Za-z0-9_-]{1,64}">
  <label for="plan">Genomförandeplan (valfri) <span lang="en">· Care plan (optional)</span></label>
  <input id="plan" name="plan" autocomplete="off" inputmode="numeric">
  <label for="site">Plats (valfri) <span lang="en">· Site (optional)</span></label>
  <input id="site" name="site" autocomplete="off" pattern="[A-Za-z0-9_-]{1,64}">
  <button id="pair-button" type="submit">Parkoppla <span lang="en">· Pair</span></button>
  <button id="deny-button" type="button" class="secondary">Inte den här enheten
    <span lang="en">· Not this device</span></button>
</form>

<section id="progress" hidden aria-labelledby="progress-title">
  <h2 id="progress-title">3. Driftsättningstest <span lang="en">· Commissioning test</span></h2>
  <p>Enhet <span lang="en">· Device</span>: <strong id="device-id"></strong></p>
  <ol id="steps" aria-live="polite"></ol>
  <p id="result" role="status" class="result"></p>
  <button id="retest-button" type="button" hidden>Testa igen
    <span lang="en">· Test again</span></button>
</section>
</main>
</body>
</html>
"""

PAIR_CSS = """
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0;font:17px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  color:#1b1b1b;background:#f6f7f9}
main{max-width:34rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.2rem 0 1rem}
h2{font-size:1.1rem;margin:0 0 .6rem}
span[lang=en]{color:#5a5f66;font-weight:normal}
form,section,details{background:#fff;border:1px solid #d8dce2;border-radius:10px;
  padding:1rem;margin:0 0 1rem}
label{display:block;margin:.7rem 0 .25rem;font-weight:600}
label.check{font-weight:normal;display:flex;gap:.6rem;align-items:flex-start}
label.check input{width:1.4rem;height:1.4rem;margin-top:.1rem;flex:none}
input{width:100%;font:inherit;padding:.7rem;border:1px solid #8a9099;border-radius:8px}
#code{font-size:1.6rem;letter-spacing:.15em;text-transform:uppercase;
  font-family:ui-monospace,monospace}
input:focus,button:focus{outline:3px solid #1a73e8;outline-offset:2px}
button{display:block;width:100%;min-height:3rem;margin-top:1rem;font:inherit;font-weight:600;
  color:#fff;background:#0b5cad;border:0;border-radius:8px}
button.secondary{background:#fff;color:#0b5cad;border:1px solid #0b5cad}
button span[lang=en]{color:inherit;font-weight:normal}
button:disabled{opacity:.6}
dl{margin:0}
dt{font-weight:600;margin-top:.5rem}
dd{margin:0;font-size:1.15rem;font-family:ui-monospace,monospace;overflow-wrap:anywhere}
.error{background:#fde8e8;border:1px solid #b3261e;color:#7a1710;padding:.8rem;border-radius:8px}
.hint{font-size:.9rem;color:#5a5f66}
#steps{padding-left:1.4rem}
#steps li{margin:.35rem 0}
#steps li.ok::marker{content:"✓  ";color:#137333}
#steps li.failed::marker{content:"✗  ";color:#b3261e}
#steps li.pending{color:#5a5f66}
.result{font-weight:700;font-size:1.1rem}
"""

PAIR_JS = r"""
"use strict";
const STEPS = {
  connected: "Ansluten · Connected",
  locked: "Rapporterar LÅST · Reports LOCKED",
  armed: "Testfönster öppnat (ARMED) · Test window armed",
  camera_on: "Kameran på · Camera on",
  camera_off: "Kameran av · Camera off",
  locked_again: "Låst igen · Locked again",
};
const $ = (id) => document.getElementById(id);
let code = "", pairingId = null, deviceId = null, timer = null;

function token() {
  const typed = $("token").value.trim();
  if (typed) sessionStorage.setItem("tillsyn-token", typed);
  return typed || sessionStorage.getItem("tillsyn-token") || "";
}

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body)});
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    let why = data && data.detail ? data.detail : resp.statusText;
    if (Array.isArray(why)) why = why.map((d) => d.msg).join("; ");
    if (resp.status === 401) { $("signin").open = true; why = "Logga in först · Sign in first"; }
    throw new Error(why);
  }
  return data;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
  if (message) box.focus && box.scrollIntoView({block: "nearest"});
}

function busy(button, on) { button.disabled = on; button.setAttribute("aria-busy", String(on)); }

async function find(event) {
  event.preventDefault();
  showError("");
  code = $("code").value.trim().toUpperCase();
  const button = $("find-button");
  busy(button, true);
  try {
    const found = await api("POST", "/api/pairing/lookup", {code});
    $("serial").textContent = found.serial;
    $("kind").textContent = found.kind;
    $("firmware").textContent = found.firmware;
    $("pair").hidden = false;
    $("serial-ok").focus();
  } catch (err) { showError(err.message); }
  finally { busy(button, false); }
}

async function pair(event) {
  event.preventDefault();
  showError("");
  if (!$("serial-ok").checked) { showError("Bekräfta serienumret · Confirm the serial"); return; }
  const resident = $("resident").value.trim();
  if (!resident) { showError("Ange brukare · Enter the resident"); $("resident").focus(); return; }
  const body = {code, resident_id: resident, serial: $("serial").textContent};
  const plan = $("plan").value.trim(), site = $("site").value.trim();
  if (plan) body.plan_id = plan;
  if (site) body.site = site;
  const button = $("pair-button");
  busy(button, true);
  try {
    const paired = await api("POST", "/api/pairing", body);
    pairingId = paired.pairing_id; deviceId = paired.device_id;
    $("signin").open = false;
    $("device-id").textContent = deviceId;
    $("find").hidden = true; $("pair").hidden = true; $("progress").hidden = false;
    render({state: paired.state, commissioning: {status: "waiting", steps: []}});
    poll();
  } catch (err) { showError(err.message); }
  finally { busy(button, false); }
}

async function deny() {
  showError("");
  try {
    await api("POST", "/api/pairing/deny", {code});
    $("pair").hidden = true;
    showError("Koden avvisad · Code refused");
  } catch (err) { showError(err.message); }
}

function render(view) {
  const run = view.commissioning || {status: "waiting", steps: []};
  const done = {}; let failed = null;
  for (const s of run.steps) { if (s.ok) done[s.step] = s; else failed = s; }
  const list = $("steps");
  list.textContent = "";
  for (const [key, label] of Object.entries(STEPS)) {
    const li = document.createElement("li");
    li.dataset.step = key;
    li.textContent = label;
    if (done[key]) { li.className = "ok"; li.setAttribute("aria-label", label + ": klar / done"); }
    else if (failed && failed.step === key) {
      li.className = "failed";
      li.textContent += " — " + failed.why;
    }
    else { li.className = "pending"; }
    list.appendChild(li);
  }
  const result = $("result");
  $("progress").dataset.state = view.state || "";
  $("progress").dataset.status = run.status;
  if (view.state === "live" && run.status === "passed") {
    result.textContent = "Enheten är i drift · The device is live";
    $("retest-button").hidden = true;
    return true;
  }
  if (run.status === "failed") {
    const why = run.error ? ": " + run.error : "";
    result.textContent = "Testet misslyckades · The test failed" + why;
    $("retest-button").hidden = false;
    return true;
  }
  result.textContent = run.status === "waiting"
    ? "Väntar på att enheten ansluter … · Waiting for the device to connect …"
    : "Testar … · Testing …";
  return false;
}

async function poll() {
  clearTimeout(timer);
  try {
    const view = await api("GET", "/api/pairing/" + pairingId);
    if (render(view)) return;
  } catch (err) { showError(err.message); }
  timer = setTimeout(poll, 1000);
}

async function retest() {
  showError("");
  try {
    await api("POST", "/api/devices/" + encodeURIComponent(deviceId) + "/retest");
    $("retest-button").hidden = true;
    poll();
  } catch (err) { showError(err.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  const given = new URLSearchParams(location.search).get("code");
  if (given) $("code").value = given;
  $("find").addEventListener("submit", find);
  $("pair").addEventListener("submit", pair);
  $("deny-button").addEventListener("click", deny);
  $("retest-button").addEventListener("click", retest);
});
"""
