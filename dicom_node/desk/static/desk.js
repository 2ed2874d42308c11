// The worklist updates itself: every few seconds it asks /api/studies (same filters) and
// rebuilds the rows. Text goes in with textContent only, never as HTML.
(function () {
  "use strict";
  var table = document.getElementById("worklist");
  if (!table) { return; }
  var body = document.getElementById("worklist-rows");
  var empty = document.getElementById("empty");
  var updated = document.getElementById("updated");
  var every = parseInt(table.getAttribute("data-poll-ms"), 10) || 2000;
  var columns = ["received", "modality", "instances", "state_text", "result", "routed", "report"];

  function row(s) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-id", s.id);
    tr.className = (s.urgent ? "urgent " : "") + "state-" + s.state + (s.dead ? " dead" : "") +
      (s.uncertain ? " uncertain" : "");
    columns.forEach(function (c) {
      var td = document.createElement("td");
      td.textContent = s[c];
      if (c === "instances") { td.className = "num"; }
      tr.appendChild(td);
    });
    var td = document.createElement("td");
    var a = document.createElement("a");
    a.href = "/studies/" + encodeURIComponent(s.id);
    a.textContent = "open #" + s.id;
    td.appendChild(a);
    tr.appendChild(td);
    return tr;
  }

  function refresh() {
    fetch("/api/studies" + window.location.search, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { window.location.href = "/login"; throw new Error("logged out"); }
        return r.json();
      })
      .then(function (data) {
        var rows = document.createDocumentFragment();
        data.studies.forEach(function (s) { rows.appendChild(row(s)); });
        body.replaceChildren(rows);
        empty.hidden = data.studies.length > 0;
        updated.textContent = data.at;
      })
      .catch(function () { /* the node restarting: try again at the next tick */ })
      .finally(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
}());
