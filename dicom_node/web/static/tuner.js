// Contrast tuner: synthesizes a contrast from the series' stored T1/T2/PD maps in the
// browser with the equations and the image scale of processing/synthesis.py, and the
// window of processing/display.py. tests/test_web_browser.py compares its pixels with
// the Python synthesis (within 1 grey level) for every contrast kind.
"use strict";
(function () {
  const uid = document.getElementById("tuner-script").dataset.uid;
  const presets = JSON.parse(document.getElementById("presets").textContent);
  const equations = JSON.parse(document.getElementById("equations").textContent);
  const el = (id) => document.getElementById(id);
  const canvas = el("image"), ctx = canvas.getContext("2d");
  const state = { renders: 0, busy: true, maps: null, image: null, window: null, params: null };
  window.synthmrTuner = state;

  const SCALE_PERCENTILE = 99.5, IMAGE_TARGET = 16000.0;

  // numpy.percentile, method "linear", of an ascending Float64Array (same interpolation).
  function percentile(sorted, p) {
    const n = sorted.length;
    if (n === 0) return 0;
    const virt = (n - 1) * (p / 100);
    const prev = Math.floor(virt), next = Math.min(prev + 1, n - 1);
    const gamma = virt - prev, a = sorted[prev], b = sorted[next];
    const diff = b - a;
    return gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma;
  }
  // numpy.rint: round half to even.
  function rint(x) {
    const r = Math.round(x);
    return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
  }
  // Weighting per unit PD before any magnitude (processing.synthesis.signed_weight).
  function signedWeight(kind, r1, r2, tr, te, ti, ti2) {
    if (kind === "SE") return (1.0 - Math.exp(-tr * r1)) * Math.exp(-te * r2);
    let mz;
    if (kind === "DIR") {
      mz = 1.0 - 2.0 * Math.exp(-ti2 * r1) + 2.0 * Math.exp(-ti * r1) - Math.exp(-tr * r1);
    } else {
      mz = 1.0 - 2.0 * Math.exp(-ti * r1) + Math.exp(-tr * r1);
    }
    return mz * Math.exp(-te * r2);
  }

  function synthesize(p) {
    const m = state.maps, n = m.n, phys = new Float64Array(n);
    const signed = p.kind === "PSIR";
    for (let i = 0; i < n; i++) {
      const t1 = m.t1[i], t2 = m.t2[i], pd = m.pd[i];
      if (!(t1 > 0 && t2 > 0 && isFinite(t1) && isFinite(t2) && isFinite(pd))) { phys[i] = 0; continue; }
      const w = signedWeight(p.kind, 1.0 / t1, 1.0 / t2, p.tr, p.te, p.ti, p.ti2);
      phys[i] = pd * (signed ? w : Math.abs(w));
    }
    const absSorted = new Float64Array(n);
    for (let i = 0; i < n; i++) absSorted[i] = Math.abs(phys[i]);
    absSorted.sort();
    const ref = percentile(absSorted, SCALE_PERCENTILE);
    const scale = ref > 0 ? IMAGE_TARGET / ref : 1.0;
    const lo = signed ? -32768 : 0, hi = signed ? 32767 : 65535;
    const img = new Float64Array(n);
    for (let i = 0; i < n; i++) img[i] = Math.min(hi, Math.max(lo, rint(phys[i] * scale)));
    const sorted = Float64Array.from(img).sort();
    let center, width;
    if (n === 0) { center = 0; width = 1; }
    else if (signed) {
      const a = Float64Array.from(img, Math.abs).sort();
      const half = Math.max(percentile(a, 99.0), 1.0);
      center = 0; width = 2 * half;
    } else {
      const p1 = percentile(sorted, 1.0), p99 = percentile(sorted, 99.0);
      center = 0.5 * (p1 + p99); width = Math.max(p99 - p1, 1.0);
    }
    state.image = img; state.window = { center, width, scale };
  }

  function grey(v, center, width) {  // processing.display.grey8
    width = Math.max(width, 1e-12);
    const x = (v - (center - width / 2)) / width;
    return Math.floor(Math.min(1, Math.max(0, x)) * 255 + 0.5);
  }

  function draw() {
    const m = state.maps, z = +el("slice").value, plane = m.ny * m.nx;
    const out = ctx.createImageData(m.nx, m.ny), w = state.window;
    const zero = grey(0, w.center, w.width);
    for (let k = 0; k < plane; k++) {
      const idx = m.index[z * plane + k];
      const g = idx < 0 ? zero : grey(state.image[idx], w.center, w.width);
      out.data[4 * k] = out.data[4 * k + 1] = out.data[4 * k + 2] = g;
      out.data[4 * k + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    el("slice-out").textContent = `${z + 1} / ${m.nz}`;
  }

  function params() {
    return { kind: el("kind").value, tr: +el("tr").value, te: +el("te").value,
             ti: +el("ti").value, ti2: +el("ti2").value };
  }
  function showRows() {
    const k = el("kind").value;
    document.querySelector("label.ti").hidden = k === "SE";
    document.querySelector("label.ti2").hidden = k !== "DIR";
    el("equation").textContent = equations[k] || "";
    for (const id of ["tr", "te", "ti", "ti2"]) el(id + "-out").textContent = el(id).value;
  }
  function valid(p) {
    if (p.kind === "SE") return p.tr > 0;
    if (p.kind === "DIR") return 0 < p.ti2 && p.ti2 < p.ti && p.ti < p.tr;
    return 0 < p.ti && p.ti < p.tr;
  }
  function render() {
    if (!state.maps) return;
    showRows();
    const p = params();
    if (!valid(p)) {
      el("status").textContent = p.kind === "DIR" ? "need 0 < TI2 < TI < TR" : "need 0 < TI < TR";
      if (el("send")) el("send").disabled = true;
      return;
    }
    state.busy = true;
    const t0 = performance.now();
    synthesize(p);
    draw();
    state.params = p; state.renders += 1; state.busy = false;
    state.lastMs = performance.now() - t0;
    el("status").textContent = `${p.kind} TR ${p.tr} TE ${p.te}` +
      (p.kind !== "SE" ? ` TI ${p.ti}` : "") + (p.kind === "DIR" ? `/${p.ti2}` : "") +
      ` · ${state.lastMs.toFixed(0)} ms`;
    if (el("send")) el("send").disabled = false;
  }
  function setPreset(name) {
    const p = presets[name];
    if (!p) return;
    el("kind").value = p.kind;
    el("tr").value = p.tr_ms; el("te").value = p.te_ms;
    if (p.ti_ms != null) el("ti").value = Math.round(p.ti_ms);
    if (p.ti2_ms != null) el("ti2").value = Math.round(p.ti2_ms);
    render();
  }
  // the tests (and a user's console) can set exact values
  state.set = function (p) {
    el("kind").value = p.kind;
    for (const k of ["tr", "te", "ti", "ti2"]) if (p[k] != null) el(k).value = p[k];
    render();
    return state.params;
  };

  async function load() {
    const t0 = performance.now();
    const r = await fetch(`/api/series/${uid}/maps.bin`, { credentials: "same-origin" });
    if (!r.ok) { el("status").textContent = "maps not available: " + r.status; return; }
    const buf = await r.arrayBuffer();
    const [nz, ny, nx, n] = new Uint32Array(buf, 0, 4);
    const maps = { nz, ny, nx, n,
      t1: new Float32Array(buf, 16, n), t2: new Float32Array(buf, 16 + 4 * n, n),
      pd: new Float32Array(buf, 16 + 8 * n, n) };
    const mask = new Uint8Array(buf, 16 + 12 * n, nz * ny * nx);
    maps.index = new Int32Array(nz * ny * nx);
    let j = 0;
    for (let i = 0; i < mask.length; i++) maps.index[i] = mask[i] ? j++ : -1;
    state.maps = maps; state.loadMs = performance.now() - t0;
    const first = Object.keys(presets).find((k) => k.endsWith("(this series)")) || Object.keys(presets)[0];
    el("preset").value = first;
    setPreset(first);
  }

  el("preset").addEventListener("change", (e) => setPreset(e.target.value));
  for (const id of ["kind", "tr", "te", "ti", "ti2"]) el(id).addEventListener("input", render);
  el("slice").addEventListener("input", () => state.maps && state.image && draw());
  if (el("send")) {
    el("send").addEventListener("click", async () => {
      const p = params();
      el("send").disabled = true;
      const res = await synthmr.postJSON(`/api/series/${uid}/send`, {
        kind: p.kind, tr_ms: p.tr, te_ms: p.te,
        ti_ms: p.kind === "SE" ? null : p.ti, ti2_ms: p.kind === "DIR" ? p.ti2 : null });
      const box = el("send-result");
      box.hidden = false;
      box.textContent = res.ok ? res.data.message : `refused (${res.status}): ${res.data.error}`;
      state.sent = res;
      el("send").disabled = false;
    });
  }
  load();
})();
