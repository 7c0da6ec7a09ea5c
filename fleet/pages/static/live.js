// Live updates for the night staff's page: poll a server-rendered fragment, swap it in
// when it changed (ETag), keep focus and typed text. No framework, no build step.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.fetch) return;
  var src = live.getAttribute("data-src");
  var errorBox = document.getElementById("live-error");
  var updated = document.getElementById("updated");
  var etag = null;
  var EVERY_MS = 5000;

  function hhmm() {
    var d = new Date();
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2) + ":" + ("0" + d.getSeconds()).slice(-2);
  }

  function swap(html) {
    var active = document.activeElement;
    var focusId = active && live.contains(active) ? active.id : null;
    var typed = {};
    live.querySelectorAll("input[id], textarea[id]").forEach(function (el) {
      if (el.type !== "hidden" && el.value) typed[el.id] = el.value;
    });
    live.innerHTML = html;
    Object.keys(typed).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) el.value = typed[id];
    });
    if (focusId) {
      var again = document.getElementById(focusId);
      if (again) again.focus();
    }
  }

  function poll() {
    var headers = { "X-Tillsyn-Poll": "1" };
    if (etag) headers["If-None-Match"] = etag;
    fetch(src, { headers: headers, credentials: "same-origin", cache: "no-store" })
      .then(function (resp) {
        if (resp.status === 401 || resp.redirected || resp.status === 303) {
          window.location.href = "/login?m=expired";
          return null;
        }
        if (resp.status === 304) return null;
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        etag = resp.headers.get("ETag");
        return resp.text();
      })
      .then(function (html) {
        if (html !== null && html !== undefined) swap(html);
        if (errorBox) errorBox.hidden = true;
        if (updated) updated.textContent = hhmm();
      })
      .catch(function () {
        if (errorBox) errorBox.hidden = false;
      })
      .then(function () {
        window.setTimeout(poll, EVERY_MS);
      });
  }

  window.setTimeout(poll, EVERY_MS);
})();
