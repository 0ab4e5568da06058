/* taopd report: token view interactions (inline, no external resources). */
(function () {
  "use strict";
  var view = document.getElementById("token-view");
  var blob = document.getElementById("token-data");
  if (!view || !blob) { return; }
  var meta = JSON.parse(blob.textContent);
  var select = document.getElementById("signal-select");
  var tip = document.getElementById("tok-tip");
  var STOPS = [[0.0, [255, 255, 255]], [0.5, [253, 174, 97]], [1.0, [215, 48, 39]]];

  function colour(t) {
    t = Math.max(0, Math.min(1, t));
    for (var i = 1; i < STOPS.length; i++) {
      if (t <= STOPS[i][0]) {
        var a = STOPS[i - 1], b = STOPS[i];
        var f = (t - a[0]) / (b[0] - a[0]);
        var c = [0, 1, 2].map(function (k) { return Math.round(a[1][k] + f * (b[1][k] - a[1][k])); });
        return "rgb(" + c.join(",") + ")";
      }
    }
    return "rgb(215,48,39)";
  }

  function norm(v, st) {
    if (!st) { return 0; }
    var span = st.hi - st.lo;
    if (!(span > 0)) { return v > st.lo ? 1 : 0; }
    return Math.max(0, Math.min(1, (v - st.lo) / span));
  }

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) { return "–"; }
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(2); }
    return Number(v.toPrecision(4)).toString();
  }

  function visible(s) {
    return String(s).replace(/ /g, "\u00b7").replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192")
      .replace(/\r/g, "\u240d");
  }

  function paint(name) {
    var attr = meta.attrs[name];
    var st = meta.stats[name];
    view.setAttribute("data-signal", name);
    var toks = view.querySelectorAll("span.tok");
    for (var i = 0; i < toks.length; i++) {
      var el = toks[i];
      el.classList.remove("missing");
      if (!attr) { el.style.background = ""; el.style.color = ""; continue; }
      var raw = el.getAttribute(attr);
      var v = raw === null ? NaN : parseFloat(raw);
      if (!isFinite(v)) { el.style.background = ""; el.style.color = ""; el.classList.add("missing"); continue; }
      var t = norm(v, st);
      el.style.background = colour(t);
      el.style.color = t > 0.85 ? "#fff" : "";
    }
    var lo = document.getElementById("legend-lo"), hi = document.getElementById("legend-hi");
    var nm = document.getElementById("legend-name");
    if (lo) { lo.textContent = st ? "\u2264 " + fmt(st.lo) : ""; }
    if (hi) { hi.textContent = st ? "\u2265 " + fmt(st.hi) : ""; }
    if (nm) { nm.textContent = attr ? name : "no colouring"; }
    if (select && select.value !== name) { select.value = name; }
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }

  function topTable(title, list, sampled) {
    var wrap = document.createElement("div");
    var h = document.createElement("div");
    h.className = "tt-head";
    h.textContent = title;
    wrap.appendChild(h);
    var table = document.createElement("table");
    (list || []).forEach(function (pair) {
      var tr = document.createElement("tr");
      if (pair[0] === sampled) { tr.className = "sampled"; }
      cell(tr, visible(pair[0]));
      cell(tr, fmt(pair[1]), "num");
      table.appendChild(tr);
    });
    if (!list || !list.length) {
      var tr0 = document.createElement("tr");
      cell(tr0, "(not recorded)");
      table.appendChild(tr0);
    }
    wrap.appendChild(table);
    return wrap;
  }

  function fillTip(el) {
    var sampleEl = el.closest(".sample");
    var si = sampleEl ? parseInt(sampleEl.getAttribute("data-sample"), 10) : -1;
    var pos = parseInt(el.getAttribute("data-pos"), 10);
    var raw = (meta.tokens[si] || [])[pos];
    while (tip.firstChild) { tip.removeChild(tip.firstChild); }
    var head = document.createElement("div");
    head.className = "tt-head";
    var code = document.createElement("code");
    code.textContent = visible(raw === undefined ? el.textContent : raw);
    head.appendChild(document.createTextNode("token " + pos + " "));
    head.appendChild(code);
    head.appendChild(document.createTextNode(el.classList.contains("selected") ? "  \u2014 selected" : "  \u2014 not selected"));
    tip.appendChild(head);
    var table = document.createElement("table");
    var hr = document.createElement("tr");
    ["signal", "value", "page-norm"].forEach(function (t) {
      var th = document.createElement("th"); th.textContent = t; hr.appendChild(th);
    });
    table.appendChild(hr);
    meta.signals.forEach(function (name) {
      var rawv = el.getAttribute(meta.attrs[name]);
      var v = rawv === null ? NaN : parseFloat(rawv);
      var tr = document.createElement("tr");
      cell(tr, name);
      cell(tr, fmt(v), "num");
      cell(tr, isFinite(v) ? fmt(norm(v, meta.stats[name])) : "–", "num");
      table.appendChild(tr);
    });
    tip.appendChild(table);
    var tops = (meta.tops[si] || [])[pos] || [null, null];
    var cols = document.createElement("div");
    cols.className = "cols";
    cols.appendChild(topTable("student top", tops[0], raw));
    cols.appendChild(topTable("teacher top", tops[1], raw));
    tip.appendChild(cols);
  }

  function place(ev) {
    var pad = 14;
    var x = ev.pageX + pad, y = ev.pageY + pad;
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var maxX = window.scrollX + document.documentElement.clientWidth - 8;
    var maxY = window.scrollY + window.innerHeight - 8;
    if (x + w > maxX) { x = Math.max(window.scrollX + 4, ev.pageX - w - pad); }
    if (y + h > maxY) { y = Math.max(window.scrollY + 4, ev.pageY - h - pad); }
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }

  var current = null;
  view.addEventListener("mouseover", function (ev) {
    var el = ev.target.closest ? ev.target.closest("span.tok") : null;
    if (!el || !tip) { return; }
    if (el !== current) { current = el; fillTip(el); }
    tip.style.display = "block";
    place(ev);
  });
  view.addEventListener("mousemove", function (ev) {
    if (current && tip && tip.style.display === "block") { place(ev); }
  });
  view.addEventListener("mouseout", function (ev) {
    var to = ev.relatedTarget;
    if (to && to.closest && to.closest("span.tok") === current) { return; }
    if (tip) { tip.style.display = "none"; }
    current = null;
  });

  if (select) {
    select.addEventListener("change", function () {
      paint(select.value);
      try { history.replaceState(null, "", "#signal=" + encodeURIComponent(select.value)); } catch (e) { /* file:// */ }
    });
  }
  var initial = meta.initial;
  var m = /(?:^#|&)signal=([^&]+)/.exec(window.location.hash || "");
  if (m) {
    var asked = decodeURIComponent(m[1]);
    if (asked === "none" || meta.attrs[asked]) { initial = asked; }
  }
  paint(initial);
  view.setAttribute("data-js", "ready");
})();
