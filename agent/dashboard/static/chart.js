// Tiny SVG charts for the dashboard: a time line chart and a bar chart. No dependencies.
"use strict";

const Chart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const H = 170, PAD_L = 58, PAD_R = 8, PAD_T = 8, PAD_B = 20;

  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function hhmm(t) {
    const d = new Date(t);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // axis labels: as few digits as the scale needs ("7.5 kW", "200 W", "1.5 kWh")
  function frame(container, ymax, yfmt) {
    const W = Math.max(260, container.clientWidth || 300);
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img" });
    const y = v => PAD_T + (H - PAD_T - PAD_B) * (1 - v / ymax);
    for (const f of [0, 0.5, 1]) {
      svg.appendChild(el("line", { x1: PAD_L, x2: W - PAD_R, y1: y(ymax * f), y2: y(ymax * f), class: "axis" }));
      svg.appendChild(el("text", { x: PAD_L - 4, y: y(ymax * f) + 4, "text-anchor": "end" }, yfmt(ymax * f)));
    }
    return { svg, W, y };
  }

  function empty(container, msg) {
    container.innerHTML = "";
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = msg || "no data yet";
    container.appendChild(p);
  }

  // series: [{name, color, points: [[t, v], ...]}]; opts: {t0, t1, yfmt}
  function line(container, series, opts) {
    const pts = series.flatMap(s => s.points);
    if (!pts.length) return empty(container);
    const t0 = opts.t0 ?? Math.min(...pts.map(p => p[0]));
    const t1 = Math.max(opts.t1 ?? 0, ...pts.map(p => p[0]), t0 + 1);
    const ymax = niceMax(Math.max(...pts.map(p => p[1])));
    const { svg, W, y } = frame(container, ymax, opts.yfmt || String);
    const x = t => PAD_L + (W - PAD_L - PAD_R) * (t - t0) / (t1 - t0);
    for (const s of series) {
      if (!s.points.length) continue;
      // a gap longer than opts.gap (ms) breaks the line
      let d = "", prev = null;
      for (const [t, v] of s.points) {
        d += (prev === null || (opts.gap && t - prev > opts.gap) ? "M" : "L") + x(t).toFixed(1) + "," + y(v).toFixed(1);
        prev = t;
      }
      svg.appendChild(el("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.8 }));
    }
    for (const f of [0, 0.5, 1]) {
      const t = t0 + (t1 - t0) * f;
      svg.appendChild(el("text", { x: x(t), y: H - 5, "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle" }, hhmm(t)));
    }
    container.innerHTML = "";
    container.appendChild(svg);
    container.appendChild(legend(series));
  }

  // bars: [[t, v1, v2, ...]], one bar per series side by side (the series are not summed:
  // grid and battery side measure the same energy); series: [{name, color}];
  // opts: {label(t), yfmt, flag(row) -> text or null: a marked group (an incomplete day)}
  function bars(container, rows, series, opts) {
    if (!rows.length) return empty(container);
    const ymax = niceMax(Math.max(...rows.map(r => Math.max(...r.slice(1, series.length + 1)))));
    const { svg, W, y } = frame(container, ymax, opts.yfmt || String);
    const n = rows.length, bw = (W - PAD_L - PAD_R) / n, sw = bw * 0.8 / series.length;
    rows.forEach((r, i) => {
      const why = opts.flag ? opts.flag(r) : null;
      if (why) {  // a dashed frame over the day and a "!" above it
        const g = el("g", { class: "flagged", "data-t": r[0] });
        g.appendChild(el("rect", { x: PAD_L + i * bw + bw * 0.05, width: bw * 0.9, y: PAD_T, height: y(0) - PAD_T,
                                   fill: "none", stroke: "#d98e04", "stroke-dasharray": "4 3" }));
        g.appendChild(el("text", { x: PAD_L + (i + 0.5) * bw, y: PAD_T + 12, "text-anchor": "middle", class: "flag" }, "!"));
        g.appendChild(el("title", {}, `${opts.label(r[0])}: ${why}`));
        svg.appendChild(g);
      }
      series.forEach((s, k) => {
        const v = r[k + 1];
        if (!(v > 0)) return;
        const rect = el("rect", { x: PAD_L + i * bw + bw * 0.1 + k * sw, width: Math.max(1, sw),
                                  y: y(v), height: y(0) - y(v), fill: s.color });
        rect.appendChild(el("title", {}, `${opts.label(r[0])}: ${s.name} ${opts.yfmt(v)}`));
        svg.appendChild(rect);
      });
    });
    // at most ~6 labels, the last one only when it does not crowd the one before
    const every = Math.ceil(n / 6);
    rows.forEach((r, i) => {
      if (i % every === 0 || (i === n - 1 && i % every >= every / 2 + 1))
        svg.appendChild(el("text", { x: PAD_L + (i + 0.5) * bw, y: H - 5, "text-anchor": "middle" }, opts.label(r[0])));
    });
    container.innerHTML = "";
    container.appendChild(svg);
    container.appendChild(legend(series));
  }

  function legend(series) {
    const d = document.createElement("div");
    d.className = "legend";
    for (const s of series) {
      const span = document.createElement("span");
      const i = document.createElement("i");
      i.style.background = s.color;
      span.appendChild(i);
      span.appendChild(document.createTextNode(s.name));
      d.appendChild(span);
    }
    return d;
  }

  return { line, bars, hhmm };
})();
