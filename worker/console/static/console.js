// qbgw console: the only script (served by the app; no inline script is allowed by the page's policy).
"use strict";
(function () {
  // Sign out when idle: after the server's idle limit, leave the page for the console's home (a GET, never a
  // form sent again, and the page left out of the history): the server has ended the session by then and
  // answers with the sign-in page, so nothing, an answer least of all, stays on the screen.
  var idle = parseInt(document.body.dataset.idle || "0", 10);
  if (idle > 0) {
    setTimeout(function () { window.location.replace(document.body.dataset.home); }, (idle + 1) * 1000);
  }
  // "Verify now": poll the progress while the background verification runs.
  var box = document.getElementById("progress");
  if (box && box.dataset.state === "running") {
    var bar = document.getElementById("progress-bar");
    var text = document.getElementById("progress-text");
    var poll = function () {
      fetch(box.dataset.url, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (p) {
          if (!p) { return; }
          bar.max = p.total || 1;
          bar.value = p.checked;
          if (p.state === "running") {
            text.textContent = "Checking: " + p.checked + " of " + p.total + " events…";
            setTimeout(poll, 500);
          } else if (p.state === "done") {
            text.textContent = (p.ok ? "Intact" : "TAMPERED") + ": " + p.checked + " events checked.";
            box.dataset.state = "done";
            var button = document.getElementById("verify");
            if (button) { button.disabled = false; }
          } else {
            text.textContent = p.detail || p.state;
          }
        });
    };
    poll();
  }
})();
