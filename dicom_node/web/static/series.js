// Series list: poll /api/series every 2 s with the page's filters and redraw the rows.
"use strict";
(function () {
  const body = document.getElementById("series-body");
  const live = document.getElementById("live");
  const fmt = (v) => (v === null || v === undefined ? "" : v);
  window.synthmrSeries = { polls: 0 };
  function row(r) {
    return `<tr data-uid="${synthmr.esc(r.series_uid)}" class="state-${r.state}">
<td>${synthmr.esc(r.first_received_text)}</td>
<td><a href="/series/${synthmr.esc(r.series_uid)}">${synthmr.esc(r.description || r.series_uid)}</a></td>
<td>${synthmr.esc(r.vendor)}</td><td><span class="badge ${r.state}">${r.state}</span></td>
<td>${r.instances}</td><td>${fmt(r.times_s.complete)}</td><td>${fmt(r.times_s.processed)}</td>
<td>${fmt(r.times_s.delivered)}</td><td><span class="qc ${synthmr.esc(r.qc_status)}">${synthmr.esc(r.qc_status)}</span></td>
<td class="reason">${synthmr.esc(r.reason)}</td></tr>`;
  }
  async function poll() {
    try {
      const r = await fetch("/api/series" + window.location.search, { credentials: "same-origin" });
      if (r.status === 401) { window.location = "/login?next=/series"; return; }
      const data = await r.json();
      body.innerHTML = data.series.map(row).join("");
      live.textContent = "live · updated " + new Date().toLocaleTimeString();
      window.synthmrSeries.polls += 1;
    } catch (e) {
      live.textContent = "live updates paused: " + e;
    }
  }
  setInterval(poll, 2000);
})();
