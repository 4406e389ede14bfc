// keel dashboard, Quality page (#/quality): online quality from /api/quality ([evals.online]).
// One chart per scorer: the mean score of each (model version, prompt version) over time, with its 95% CI,
// and a dashed line where a new version was first scored; then the test of the latest change and a table.
// Registered in window.keelPages before app.js runs; app.js shows the view and calls open(hash, kit) with its helpers.
// Every value from the store reaches the page through textContent, never as HTML.
"use strict";

(() => {
  const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];
  const PERIOD_S = { hour: 3600, day: 86400, week: 7 * 86400 };
  let request = 0; // answers of an older request are dropped

  const $ = (selector) => document.querySelector(selector);
  const fmt = (v) => (v === null || v === undefined ? "–" : v.toFixed(3));
  const seriesKey = (r) => r.model_version + " · prompt " + r.prompt_version;

  function params() {
    const until = Math.floor(Date.now() / 1000);
    return { since: until - Number($("#quality-range").value), until, period: $("#quality-period").value };
  }

  async function open(d) {
    const mine = ++request;
    d.clearError();
    try {
      const body = await d.api("quality", params());
      if (mine !== request) return;
      render(d, body);
      d.markUpdated();
    } catch (error) {
      d.showError(error);
    }
  }

  function usd(value) {
    return value === 0 ? "$0" : value >= 1 ? "$" + value.toFixed(2) : "$" + value.toPrecision(2);
  }

  function render(d, body) {
    const o = body.online;
    $("#quality-config").textContent = o.sample > 0
      ? `${+(o.sample * 100).toPrecision(3)}% of calls scored every ${o.interval_s} s · ${o.scorers.join(", ")}`
        + ` · scoring cost ${usd(body.cost_usd || 0)} in this range`  // the judges' model calls: watching has a price
      : "[evals.online] sample is 0: no call is scored";
    // a catch-up after a long pause stops at max_backfill_s: say which calls were never scored
    let skipped = $("#quality-skipped");
    if (!skipped) {
      skipped = d.h("span", { class: "hint", id: "quality-skipped", style: "display:block" });
      $("#quality-config").after(skipped);
    }
    skipped.hidden = !o.skipped;
    skipped.textContent = o.skipped
      ? `Not scored: the calls from ${d.fmtDateTime(o.skipped.from_ts)} to ${d.fmtDateTime(o.skipped.until_ts)}`
        + ` (sampling was off or no server ran; a catch-up goes back ${o.max_backfill_s} s at most: max_backfill_s)`
      : "";
    const charts = $("#quality-charts");
    if (!body.rows.length) {
      d.replace(charts, d.h("div", { class: "empty", text: "No online scores in this range" }));
    } else {
      d.replace(charts, ...body.scorers.map((scorer) => scorerChart(d, body, scorer)));
    }
    renderTable(d, body);
  }

  function colors(rows) {
    const keys = [...new Set(rows.map(seriesKey))];
    return Object.fromEntries(keys.map((k, i) => [k, PALETTE[i % PALETTE.length]]));
  }

  function scorerChart(d, body, scorer) {
    const rows = body.rows.filter((r) => r.scorer === scorer && r.mean !== null);
    const color = colors(body.rows);
    const test = body.tests.find((t) => t.scorer === scorer);
    const box = d.h("div", { class: "quality-chart", "data-scorer": scorer });
    const width = Math.max(320, Math.floor($("#quality-charts").clientWidth || 600) - 8);
    const height = 220;
    const plot = d.plotArea(width, height);
    const svg = d.svgRoot(width, height, "Mean " + scorer + " over time");
    const step = PERIOD_S[body.period_s === 3600 ? "hour" : body.period_s === 86400 ? "day" : "week"] || body.period_s;
    const start = Math.floor(body.since_ts / step) * step;
    const slots = Math.max(1, Math.ceil((body.until_ts - start) / step));
    const slot = plot.width / slots;
    const xOf = (t) => plot.left + ((t - start) / step) * slot + slot / 2;
    const yOf = (v) => plot.top + plot.height - v * plot.height;
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      svg.append(d.s("line", { class: v ? "grid-line" : "axis-line", x1: plot.left, x2: plot.left + plot.width, y1: yOf(v), y2: yOf(v) }));
      svg.append(d.s("text", { x: plot.left - 6, y: yOf(v) + 4, "text-anchor": "end", text: v.toFixed(2) }));
    }
    d.xLabels(svg, plot, slots, (i) => d.fmtBucket(start + i * step, step, body.until_ts - body.since_ts));
    for (const change of body.changes) {
      const x = plot.left + ((change.ts - start) / step) * slot;
      if (x < plot.left || x > plot.left + plot.width) continue;
      const label = change.model_version + " / " + change.prompt_version;
      svg.append(d.withTip(d.s("line", {
        class: "change-line", x1: x, x2: x, y1: plot.top, y2: plot.top + plot.height,
        stroke: "#6b7280", "stroke-dasharray": "4 3", "stroke-width": 1.5,
      }), ["Version change", ["First scored", d.fmtDateTime(change.ts)], ["Model", change.model_version], ["Prompt", change.prompt_version]]));
      // a change near the right edge gets its label on the left of the line, else the svg cuts it off
      const left = x > plot.left + plot.width - 200;
      svg.append(d.s("text", {
        class: "change-label", x: left ? x - 4 : x + 4, y: plot.top + 10, fill: "#374151", "text-anchor": left ? "end" : "start",
        text: d.clip(label, 28),
      }));
    }
    const bySeries = {};
    for (const r of rows) (bySeries[seriesKey(r)] = bySeries[seriesKey(r)] || []).push(r);
    for (const [key, points] of Object.entries(bySeries)) {
      points.sort((a, b) => a.period_ts - b.period_ts);
      const c = color[key];
      let path = "";
      points.forEach((r, i) => {
        const x = xOf(r.period_ts);
        path += (i ? "L" : "M") + x.toFixed(1) + " " + yOf(r.mean).toFixed(1);
        if (r.ci_low !== null) svg.append(d.s("line", { x1: x, x2: x, y1: yOf(r.ci_low), y2: yOf(r.ci_high), stroke: c, "stroke-opacity": 0.45, "stroke-width": 6, "stroke-linecap": "round" }));
      });
      svg.append(d.s("path", { d: path, fill: "none", stroke: c, "stroke-width": 2, class: "quality-line" }));
      for (const r of points) {
        svg.append(d.withTip(d.s("circle", { cx: xOf(r.period_ts), cy: yOf(r.mean), r: 4, fill: c, class: "quality-dot" }), [
          scorer + " · " + key, ["Period", r.period.slice(0, 16).replace("T", " ")], ["Mean", fmt(r.mean)],
          ["95% CI", r.ci_low === null ? "–" : `${fmt(r.ci_low)} – ${fmt(r.ci_high)}`], ["n", d.fmtInt(r.n)],
          ["Errored", d.fmtInt(r.errors)],
        ]));
      }
    }
    const legend = d.h("div", { class: "legend" }, Object.keys(bySeries).map((key) =>
      d.h("span", { class: "legend-item" }, d.h("i", { style: `background:${color[key]}` }), key)));
    box.append(d.h("header", null, d.h("h3", { text: scorer }), legend), svg);
    if (test) box.append(testLine(d, test));
    return box;
  }

  function testLine(d, t) {
    const dropped = t.drop !== null && t.drop > 0 && t.p_value !== null && t.p_value < 0.05;
    const p = t.p_value === null ? "not tested (too few scores)" : "one-sided p = " + t.p_value.toPrecision(2);
    const previous = t.previous ? t.previous[0] + " / " + t.previous[1] : "?";
    return d.h("p", { class: "quality-test" + (dropped ? " bad" : ""), "data-significant": dropped ? "yes" : "no" },
      `Latest change ${d.fmtDateTime(t.change.ts)}: ${previous} → ${t.change.model_version} / ${t.change.prompt_version}. `
      + `Mean ${fmt(t.mean_after)} (n ${t.n_after}) after against ${fmt(t.mean_before)} (n ${t.n_before}) before; ${p}`
      + (dropped ? " — a significant drop" : ""));
  }

  function renderTable(d, body) {
    const tbody = $("#quality-table tbody");
    const rows = [...body.rows].sort((a, b) => b.period_ts - a.period_ts || a.scorer.localeCompare(b.scorer));
    d.replace(tbody, rows.map((r) => d.h("tr", null,
      d.h("td", { text: r.period.slice(0, body.period_s < 86400 ? 16 : 10).replace("T", " ") }),
      d.h("td", { text: r.model_version }), d.h("td", { text: r.prompt_version }), d.h("td", { text: r.scorer }),
      d.h("td", { class: "num", text: d.fmtInt(r.n) }), d.h("td", { class: "num", text: r.errors ? d.fmtInt(r.errors) : "" }),
      d.h("td", { class: "num", text: fmt(r.mean) }),
      d.h("td", { text: r.ci_low === null ? "–" : `${fmt(r.ci_low)} – ${fmt(r.ci_high)}` }))));
  }

  let bound = false;
  (window.keelPages = window.keelPages || []).push({
    view: "quality-view",
    nav: "quality",
    match: (hash) => hash === "#/quality",
    open(hash, d) {
      if (!bound) {
        bound = true;
        $("#quality-range").addEventListener("change", () => open(d));
        $("#quality-period").addEventListener("change", () => open(d));
      }
      open(d);
    },
  });
})();
