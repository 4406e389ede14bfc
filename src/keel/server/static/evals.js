// keel dashboard, the Evals page: #/evals (the runs; pick two to compare), #/evals/RUN (one run's report)
// and #/evals/compare/A/B (B against the baseline A).
// Reads /api/evals, /api/evals/{run} and /api/evals/compare: the numbers `keel eval report` draws into its
// HTML file (keel.evals.report_data) and the comparison exactly as `keel eval compare` computes it; the
// plots are drawn here as SVG. Loaded before app.js, it registers itself on window.keelPages; app.js
// routes here and hands over its helpers (the kit). Every value reaches the page through textContent.
"use strict";

(() => {
  // the HTML report's palette: a run has the same colour in the file and on the page
  const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"];
  const color = (i) => COLORS[i % COLORS.length];
  const TEXT_CLIP = 400; // characters of an input or output shown in a cell (the whole text on hover)
  const REFRESH_MS = 3000; // a page showing a running run reloads it this often

  let k = null; // app.js's kit
  let request = 0; // the latest load: an older answer is dropped
  let picked = []; // run ids ticked in the runs table, in the order they were ticked (the first is A)

  const el = () => k.$("#evals-view");

  // --- formatting -----------------------------------------------------------------------------

  function num(value, digits = 3) {
    return value === null || value === undefined ? "–" : value.toFixed(digits);
  }

  function signed(value, digits = 3) {
    if (value === null || value === undefined) return "–";
    const text = value.toFixed(digits);
    if (Number(text) === 0) return (0).toFixed(digits); // neither "+0.00" nor "-0.00"
    return (value > 0 ? "+" : "") + text;
  }

  function pct(value) {
    return value === null || value === undefined ? "–" : (value * 100).toFixed(1) + "%";
  }

  function pValue(p) {
    if (p === null || p === undefined) return "–";
    return p < 1e-4 ? "<0.0001" : p.toFixed(4);
  }

  function seconds(s) {
    return s === null || s === undefined ? "–" : k.fmtMs(s * 1000);
  }

  /** A dataset value (text, or JSON for anything else) clipped for a cell; the whole of it on hover. */
  function textCell(value, cls) {
    const text = value === null || value === undefined ? "" : typeof value === "string" ? value : JSON.stringify(value);
    return k.h("td", { class: "eval-text" + (cls ? " " + cls : ""), title: text.length > TEXT_CLIP ? text : null, text: k.clip(text, TEXT_CLIP) || "–" });
  }

  function statusBadge(status) {
    const cls = { done: "ok", running: "running", failed: "error", cancelled: "cancelled" }[status] || "pending";
    return k.h("span", { class: "badge " + cls, text: status });
  }

  function verdictClass(verdict) {
    if (verdict === "worse" || verdict === "higher") return "eval-worse";
    if (verdict === "better" || verdict === "lower") return "eval-better";
    return "muted";
  }

  function swatch(i) {
    return k.h("i", { class: "eval-swatch", style: `background:${color(i)}` });
  }

  function card(title, hint, ...body) {
    return k.h("section", { class: "card eval-card" },
      k.h("header", null, k.h("h2", { text: title }), hint ? k.h("span", { class: "hint", text: hint }) : null), ...body);
  }

  function emptyNote(message) {
    return k.h("div", { class: "eval-empty", text: message });
  }

  function traceLink(traceId, here, title, text) {
    if (!traceId) return k.h("span", { class: "muted", text: "–" });
    const link = k.h("a", { class: "trace-link", href: "#/trace/" + encodeURIComponent(traceId), text: text || k.shortId(traceId), title: title + ": " + traceId });
    link.addEventListener("click", () => { k.state.returnTo = here; k.state.returnLabel = "← Eval"; });
    return link;
  }

  function head(title, meta, stats, extra) {
    const back = k.h("button", { type: "button", class: "btn", text: "← Evals", onclick: () => { location.hash = "#/evals"; } });
    const stat = ([label, value]) => k.h("div", null, k.h("dt", { text: label }), k.h("dd", { text: value }));
    return k.h("div", { class: "trace-head" }, back,
      k.h("div", { class: "trace-title" }, k.h("h1", null, title), k.h("span", { class: "hint", text: meta }), extra),
      k.h("dl", { class: "trace-stats" }, stats.map(stat)));
  }

  // --- plots ----------------------------------------------------------------------------------

  function box(width, height) {
    return { width, height, plot: { left: 40, top: 8, width: width - 40 - 10, height: height - 8 - 34 } };
  }

  function axisY(svg, plot, max, step, format) {
    for (let v = 0; v <= max + 1e-9; v += step) {
      const y = plot.top + plot.height - (v / max) * plot.height;
      svg.append(k.s("line", { class: v ? "grid-line" : "axis-line", x1: plot.left, x2: plot.left + plot.width, y1: y, y2: y }));
      svg.append(k.s("text", { x: plot.left - 6, y: y + 4, "text-anchor": "end", text: format(v) }));
    }
  }

  function legend(runs) {
    return k.h("div", { class: "legend eval-legend" }, runs.map((r, i) => k.h("span", null, swatch(i), r.label)));
  }

  /** One metric's histogram over [0, 1]: each run's share of cases per bin, side by side; dashed: the mean. */
  function histogram(d, runs, width) {
    const { height, plot } = box(width, 190);
    const shares = d.counts.map((counts, i) => counts.map((c) => c / Math.max(d.n[i], 1)));
    const top = Math.max(0.25, ...shares.flat());
    const scale = k.niceScale(top, false);
    const svg = k.svgRoot(width, height, "Distribution of " + d.metric);
    axisY(svg, plot, scale.max, scale.step, (v) => Math.round(v * 100) + "%");
    const bins = d.edges.length - 1;
    const slot = plot.width / bins;
    const bar = (slot - 4) / runs.length;
    const x = (v) => plot.left + v * plot.width;
    shares.forEach((row, i) => row.forEach((share, b) => {
      const h = (share / scale.max) * plot.height;
      const rect = k.s("rect", { x: plot.left + b * slot + 2 + i * bar, y: plot.top + plot.height - h, width: Math.max(1, bar - 1), height: h, fill: color(i) });
      svg.append(k.withTip(rect, [runs[i].label, ["scores", `${d.edges[b].toFixed(1)}–${d.edges[b + 1].toFixed(1)}`],
        ["cases", `${d.counts[i][b]} of ${d.n[i]} (${pct(share)})`]]));
    }));
    d.means.forEach((mean, i) => {
      if (mean === null) return;
      svg.append(k.withTip(k.s("line", { class: "eval-mean", x1: x(mean), x2: x(mean), y1: plot.top, y2: plot.top + plot.height, stroke: color(i) }),
        [runs[i].label, ["mean " + d.metric, num(mean)]]));
    });
    for (let t = 0; t <= 10; t += 2) {
      svg.append(k.s("text", { x: x(t / 10), y: plot.top + plot.height + 14, "text-anchor": "middle", text: (t / 10).toFixed(1) }));
    }
    svg.append(k.s("text", { x: plot.left + plot.width / 2, y: height - 3, "text-anchor": "middle", text: "score (dashed: mean) · bars: share of cases" }));
    return k.h("figure", { class: "eval-plot" }, k.h("figcaption", { text: d.metric }), svg);
  }

  function distributions(data) {
    if (!data.distributions.length) return emptyNote("No per-metric scores in this run.");
    const host = k.h("div", { class: "eval-multiples" });
    requestAnimationFrame(() => {
      const columns = Math.max(1, Math.min(3, data.distributions.length, Math.floor(host.clientWidth / 300)));
      const width = Math.floor((host.clientWidth - 16 * (columns - 1)) / columns);
      host.style.gridTemplateColumns = `repeat(${columns}, minmax(0, 1fr))`;
      host.replaceChildren(...data.distributions.map((d) => histogram(d, data.runs, Math.max(240, width))));
    });
    return [data.runs.length > 1 ? legend(data.runs) : null, host];
  }

  /**
   * Quality against one kind of spend, a point per variant (run); `points` are
   * {label, variant, quality, x, color, current}.
   */
  function scatter(points, xLabel, yLabel, formatX, width) {
    const { height, plot } = box(width, 230);
    plot.left = 46;
    plot.width = width - 46 - 16;
    const xs = points.map((p) => p.x);
    const low = Math.min(...xs);
    const high = Math.max(...xs);
    const pad = high > low ? (high - low) * 0.25 : Math.max(high * 0.5, 1e-9);
    const x0 = Math.max(0, low - pad);
    const x1 = high + pad;
    const x = (v) => plot.left + ((v - x0) / (x1 - x0)) * plot.width;
    const y = (q) => plot.top + plot.height - q * plot.height;
    const svg = k.svgRoot(width, height, yLabel + " against " + xLabel);
    axisY(svg, plot, 1, 0.25, (v) => v.toFixed(2));
    const ticks = Math.max(2, Math.min(4, Math.floor(plot.width / 110))); // labels like "$0.092" need room
    for (let i = 0; i <= ticks; i++) {
      const v = x0 + ((x1 - x0) * i) / ticks;
      svg.append(k.s("text", { x: x(v), y: plot.top + plot.height + 14, "text-anchor": i === 0 ? "start" : i === ticks ? "end" : "middle", text: formatX(v) }));
    }
    svg.append(k.s("text", { x: plot.left + plot.width / 2, y: height - 3, "text-anchor": "middle", text: xLabel }));
    svg.append(k.s("text", { x: 10, y: plot.top + plot.height / 2, transform: `rotate(-90 10 ${plot.top + plot.height / 2})`, "text-anchor": "middle", text: yLabel }));
    const middle = (low + high) / 2;
    for (const p of points) {
      const cx = x(p.x);
      const cy = y(p.quality);
      const dot = k.s("circle", { cx, cy, r: p.current ? 7 : 5.5, fill: p.color, class: p.current ? "eval-dot current" : "eval-dot" });
      svg.append(k.withTip(dot, [p.label, ["variant", p.variant], [yLabel, num(p.quality)], [xLabel, formatX(p.x)]]));
      const right = high > low && p.x > middle;
      svg.append(k.s("text", { class: "label", x: cx + (right ? -10 : 10), y: cy - 8, "text-anchor": right ? "end" : "start", text: k.clip(p.variant, 34) }));
    }
    return svg;
  }

  function spend(points, qualityLabel) {
    const kinds = [["cost per case (USD)", "cost", (v) => k.fmtCost(v)], ["latency p50", "latency", (v) => seconds(v)]];
    const usable = kinds.filter(([, key]) => points.some((p) => p[key] !== null && p[key] !== undefined));
    if (!points.length || !usable.length) return emptyNote("No run records cost or latency.");
    const host = k.h("div", { class: "eval-multiples" });
    requestAnimationFrame(() => {
      const columns = host.clientWidth >= 640 ? usable.length : 1;
      const width = Math.floor((host.clientWidth - 16 * (columns - 1)) / columns);
      host.style.gridTemplateColumns = `repeat(${columns}, minmax(0, 1fr))`;
      host.replaceChildren(...usable.map(([label, key, format]) => {
        const shown = points.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => ({ ...p, x: p[key] }));
        return k.h("figure", { class: "eval-plot" }, scatter(shown, label, qualityLabel, format, Math.max(260, width)));
      }));
    });
    return host;
  }

  /** Per tag, each run's quality as a bar, with the cases behind it. */
  function tagBars(data) {
    if (!data.tags.length) return emptyNote("No case has tags.");
    const host = k.h("div");
    requestAnimationFrame(() => {
      const width = Math.max(300, host.clientWidth);
      const runs = data.runs.length;
      const bar = 14;
      const group = runs * bar + 10;
      const labelWidth = Math.min(200, width * 0.3);
      const valueWidth = 96;
      const barSpace = width - labelWidth - valueWidth - 8;
      const svg = k.svgRoot(width, data.tags.length * group + 6, "Quality by tag");
      data.tags.forEach((row, t) => {
        const y0 = t * group + 4;
        svg.append(k.s("g", null, k.s("title", { text: row.tag }),
          k.s("text", { class: "label", x: 0, y: y0 + (runs * bar) / 2 + 4, text: k.clip(row.tag, Math.floor(labelWidth / 7)) })));
        row.quality.forEach((q, i) => {
          const y = y0 + i * bar;
          svg.append(k.s("rect", { class: "bar-track", x: labelWidth, y: y + 1, width: barSpace, height: bar - 3, rx: 2 }));
          if (q) svg.append(k.s("rect", { x: labelWidth, y: y + 1, width: Math.max(2, q * barSpace), height: bar - 3, rx: 2, fill: color(i) }));
          svg.append(k.s("text", { class: "value", x: width, y: y + bar - 3, "text-anchor": "end", text: `${num(q, 2)} (${row.n[i]})` }));
          svg.append(k.withTip(k.s("rect", { class: "hit", x: 0, y, width, height: bar }),
            [row.tag, ["run", data.runs[i].label], [data.quality_label, num(q)], ["cases", String(row.n[i])]]));
        });
      });
      host.replaceChildren(svg);
    });
    return [data.runs.length > 1 ? legend(data.runs) : null,
      k.h("div", { class: "hint eval-axis-note", text: data.quality_label + " per tag (cases in brackets); the " + data.tags.length + " most frequent tags" }), host];
  }

  /** The paired deltas B - A with their intervals; red when significantly worse, green when better. */
  function forest(comparison) {
    const rows = comparison.metrics.filter((m) => m.delta !== null);
    if (!rows.length) return null;
    const host = k.h("div", { class: "eval-forest" });
    requestAnimationFrame(() => {
      const width = Math.max(320, host.clientWidth);
      const row = 26;
      const labelWidth = 130;
      const plot = { left: labelWidth, top: 6, width: width - labelWidth - 16, height: rows.length * row };
      const height = plot.height + 40;
      const reach = Math.max(0.05, ...rows.flatMap((m) => (m.ci ? [Math.abs(m.ci[0]), Math.abs(m.ci[1])] : [Math.abs(m.delta)])));
      const scale = k.niceScale(reach, false);
      const x = (v) => plot.left + ((v + scale.max) / (2 * scale.max)) * plot.width;
      const svg = k.svgRoot(width, height, "Paired deltas with their intervals");
      for (let v = -scale.max; v <= scale.max + 1e-9; v += scale.step) {
        svg.append(k.s("line", { class: Math.abs(v) < 1e-9 ? "eval-zero" : "grid-line", x1: x(v), x2: x(v), y1: plot.top, y2: plot.top + plot.height }));
        svg.append(k.s("text", { x: x(v), y: plot.top + plot.height + 14, "text-anchor": "middle", text: signed(v, 2) }));
      }
      rows.forEach((m, i) => {
        const y = plot.top + i * row + row / 2;
        const cls = { drop: "eval-drop", rise: "eval-rise" }[m.change] || "eval-flat";
        svg.append(k.s("text", { class: "label", x: 0, y: y + 4, text: k.clip(m.kind === "pass" ? "pass rate" : m.metric, 18) }));
        if (m.ci) svg.append(k.s("line", { class: "eval-ci " + cls, x1: x(m.ci[0]), x2: x(m.ci[1]), y1: y, y2: y }));
        svg.append(k.withTip(k.s("circle", { class: "eval-delta " + cls, cx: x(m.delta), cy: y, r: 5 }),
          [m.kind === "pass" ? "pass rate" : m.metric, ["B − A", signed(m.delta)], ["interval", m.ci ? `[${signed(m.ci[0])}, ${signed(m.ci[1])}]` : "–"], ["verdict", m.verdict]]));
      });
      svg.append(k.s("text", { x: plot.left + plot.width / 2, y: height - 3, "text-anchor": "middle", text: `B − A, with its ${Math.round(comparison.metrics[0].level * 100)}% interval` }));
      host.replaceChildren(svg);
    });
    return host;
  }

  // --- tables -----------------------------------------------------------------------------------

  function table(headers, rows, cls) {
    return k.h("div", { class: "scroll-x" }, k.h("table", { class: "traces eval-table" + (cls ? " " + cls : "") },
      k.h("thead", null, k.h("tr", null, headers.map(([label, num]) => k.h("th", { class: num ? "num" : null, text: label })))),
      k.h("tbody", null, rows)));
  }

  function meansText(means) {
    const entries = Object.entries(means);
    return entries.length ? entries.map(([m, v]) => `${m} ${num(v, 2)}`).join("\n") : "–";
  }

  function shortTime(epoch) {
    const when = new Date(epoch * 1000);
    return when.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function runsSummary(runs) {
    const metrics = [...new Set(runs.flatMap((r) => Object.keys(r.means)))];
    return table([["Run"], ["Variant"], ["Cases", 1], ["Pass rate", 1], ...metrics.map((m) => [m, 1]), ["Errors", 1], ["Cost", 1], ["Latency p50 / p95", 1]],
      runs.map((r, i) => k.h("tr", { class: "eval-static" },
        k.h("td", null, swatch(i), k.h("a", { class: "job-link", href: "#/evals/" + encodeURIComponent(r.run_id), text: r.label })),
        k.h("td", { text: r.variant }),
        k.h("td", { class: "num", text: r.cases + (r.repeats > 1 ? " × " + r.repeats : "") }),
        k.h("td", { class: "num", text: num(r.pass_rate) }),
        metrics.map((m) => k.h("td", { class: "num", text: num(r.means[m]) })),
        errorsCell(r),
        k.h("td", { class: "num", text: k.fmtCost(r.cost_usd) }),
        k.h("td", { class: "num", text: seconds(r.latency_p50_s) + " / " + seconds(r.latency_p95_s) }))));
  }

  /** Task errors and errored scores of a run, in one cell. */
  function errorsCell(r) {
    const scorer = Object.values(r.errored).reduce((a, b) => a + b, 0);
    return k.h("td", { class: "num" + (r.task_errors + scorer ? " bad" : ""), title: `${r.task_errors} task error(s), ${scorer} errored score(s)`,
      text: r.task_errors + scorer ? `${r.task_errors} task · ${scorer} scorer` : "0" });
  }

  function scoresText(scores) {
    return Object.entries(scores).map(([m, v]) => `${m} ${num(v, 2)}`).join("\n") || "–";
  }

  function failingTable(cases, total, here) {
    if (!cases.length) return emptyNote("No case failed a threshold or errored.");
    return table([["Case"], ["Input"], ["Expected"], ["Output"], ["Scores"], ["Trace"]],
      cases.map((c) => k.h("tr", { class: "eval-static" },
        k.h("td", { class: "item-key", text: c.case_id + (c.repeat ? " #" + (c.repeat + 1) : "") }),
        textCell(c.input), textCell(c.expected),
        c.error ? textCell(c.error, "error-cell") : textCell(c.output),
        k.h("td", { class: "eval-scores", text: scoresText(c.scores) }),
        k.h("td", null, traceLink(c.trace_id, here, "Open this case's trace")))));
  }

  // --- #/evals -----------------------------------------------------------------------------------

  function compareBar(runs) {
    const byId = Object.fromEntries(runs.map((r) => [r.run_id, r]));
    picked = picked.filter((id) => byId[id]);
    const go = k.h("button", { type: "button", class: "btn btn-primary", id: "eval-compare", text: "Compare", disabled: picked.length !== 2 });
    go.addEventListener("click", () => {
      location.hash = "#/evals/compare/" + picked.map(encodeURIComponent).join("/");
    });
    const text = picked.length === 0 ? "Tick two runs to compare them: the first one ticked is the baseline A."
      : picked.length === 1 ? `Baseline A: ${picked[0]}. Now tick the run B to judge against it.`
        : `Compare B ${picked[1]} against the baseline A ${picked[0]}`;
    return k.h("div", { class: "eval-pick" }, k.h("span", { class: "hint", id: "eval-pick-text", text }), go);
  }

  function runRow(r, refresh) {
    const open = () => { location.hash = "#/evals/" + encodeURIComponent(r.run_id); };
    const tick = k.h("input", { type: "checkbox", class: "eval-tick", "aria-label": "Compare " + r.run_id, checked: picked.includes(r.run_id) });
    tick.addEventListener("change", () => {
      picked = tick.checked ? [...picked.filter((id) => id !== r.run_id), r.run_id].slice(-2) : picked.filter((id) => id !== r.run_id);
      refresh();
    });
    const row = k.h("tr", { class: "eval-row", "data-run": r.run_id, tabindex: 0 },
      k.h("td", { class: "eval-tick-cell" }, tick, picked.includes(r.run_id) ? k.h("span", { class: "eval-ab", text: picked.indexOf(r.run_id) ? "B" : "A" }) : null),
      k.h("td", { class: "eval-run" }, k.h("a", { class: "job-link", href: "#/evals/" + encodeURIComponent(r.run_id), text: r.run_id }),
        k.h("div", { class: "eval-sub" }, k.h("span", { class: "tag", text: r.suite }), " ", k.h("span", { class: "eval-variant", text: r.variant }))),
      k.h("td", null, statusBadge(r.status)),
      k.h("td", { class: "num", text: r.cases + (r.repeats > 1 ? " × " + r.repeats : "") }),
      k.h("td", { class: "num" }, passCell(r.pass_rate)),
      k.h("td", { class: "eval-means", text: meansText(r.means) }),
      k.h("td", { class: "num", text: k.fmtCost(r.cost_usd) }),
      k.h("td", { class: "muted" }, shortTime(r.started_at),
        k.h("div", { class: "eval-sub", text: r.finished_at ? "took " + seconds(Math.max(0, r.finished_at - r.started_at)) : "not finished" })));
    row.addEventListener("click", (e) => { if (!e.target.closest("a, input")) open(); });
    row.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.target.closest("input")) open(); });
    return row;
  }

  function passCell(rate) {
    if (rate === null || rate === undefined) return "–";
    return k.h("span", { class: "eval-pass" }, k.h("span", { class: "progress eval-pass-bar" }, k.h("span", { class: "p-done", style: `width:${rate * 100}%` })),
      k.h("span", { text: pct(rate) }));
  }

  async function showRuns(mine) {
    const body = await k.api("evals", { limit: 200 });
    if (mine !== request) return;
    const render = () => {
      const rows = body.runs.length ? body.runs.map((r) => runRow(r, render))
        : [k.h("tr", { class: "empty-row" }, k.h("td", { colspan: 8, text: body.empty_hint }))]; // names the command
      const count = `${body.runs.length} run${body.runs.length === 1 ? "" : "s"}`;
      k.replace(el(), card("Evaluation runs", count, body.runs.length ? compareBar(body.runs) : null,
        table([[""], ["Run · suite · variant"], ["Status"], ["Cases", 1], ["Pass rate", 1], ["Mean scores"], ["Cost", 1], ["Started"]], rows, "eval-runs")));
    };
    render();
    return body.runs.some((r) => r.status === "running");
  }

  // --- #/evals/RUN ----------------------------------------------------------------------------------

  function kpis(run) {
    const tile = (label, value, sub, bad) => k.h("div", { class: "kpi" + (bad ? " bad" : "") },
      k.h("div", { class: "label", text: label }), k.h("div", { class: "value", text: value }), sub ? k.h("div", { class: "sub", text: sub }) : null);
    const errored = Object.values(run.errored).reduce((a, b) => a + b, 0);
    return k.h("section", { class: "kpis eval-kpis" },
      tile("Pass rate", pct(run.pass_rate), `${run.recorded} case repeats`),
      Object.entries(run.means).slice(0, 3).map(([m, v]) => tile("Mean " + m, num(v), run.errored[m] ? run.errored[m] + " errored" : null, false)),
      tile("Errors", String(run.task_errors + errored), `${run.task_errors} task · ${errored} scorer`, run.task_errors + errored > 0),
      tile("Cost", k.fmtCost(run.cost_usd), run.cost_per_case === null ? null : k.fmtCost(run.cost_per_case) + " per case"),
      tile("Latency p50", seconds(run.latency_p50_s), "p95 " + seconds(run.latency_p95_s)));
  }

  function variantPoints(variants, current, metric) {
    return variants.map((v, i) => ({
      label: v.run_id, variant: v.variant, color: color(i), current: v.run_id === current,
      quality: metric === null ? v.pass_rate : v.means[metric], cost: v.cost_per_case, latency: v.latency_p50_s,
    })).filter((p) => p.quality !== null && p.quality !== undefined);
  }

  async function showRun(mine, runId) {
    const body = await k.api("evals/" + encodeURIComponent(runId), { failing: 50 });
    if (mine !== request) return;
    const run = body.runs[0];
    const here = "#/evals/" + encodeURIComponent(runId);
    const others = body.variants.length - 1;
    const shown = body.failing[0].length;
    const total = body.failing_total[0];
    k.replace(el(),
      head([run.run_id, " ", statusBadge(run.status)], `suite ${run.suite} · ${run.variant}`,
        [["Cases", run.cases + (run.repeats > 1 ? " × " + run.repeats : "")], ["Started", k.fmtDateTime(run.created_at)]]),
      kpis(run),
      k.h("div", { class: "eval-grid" },
        card("Score distributions", "share of cases per score bin", distributions(body)),
        card("Cost vs quality per variant", others ? `this run (ringed) and the ${others} other variant${others === 1 ? "" : "s"} of its suite run` : "one variant in its suite run",
          spend(variantPoints(body.variants, run.run_id, body.quality_metric), body.quality_label))),
      card("By tag", null, tagBars(body)),
      card("Failing cases", total ? (shown < total ? `the first ${shown} of ${total}` : `${total}`) + ` case repeat${total === 1 ? "" : "s"} that failed a threshold or errored` : null,
        failingTable(body.failing[0], total, here)));
    return body.variants.some((v) => v.status === "running");
  }

  // --- #/evals/compare/A/B ----------------------------------------------------------------------------

  function comparisonTable(c) {
    const level = Math.round((1 - c.alpha) * 1000) / 10 + "% CI";
    const names = { pass: "pass rate (McNemar)", cost: "cost per case (USD)", latency: "latency per case (s)" };
    const rows = [...c.metrics, c.cost, c.latency].filter(Boolean).map((m) => {
      const digits = m.kind === "cost" ? 6 : 3;
      const ci = m.ci ? `[${signed(m.ci[0], digits)}, ${signed(m.ci[1], digits)}]` : "–";
      return k.h("tr", { class: "eval-static" + (m.change === "drop" && m.kind !== "cost" && m.kind !== "latency" ? " eval-regression" : "") },
        k.h("td", { text: names[m.kind] || m.metric }),
        k.h("td", { class: "num", text: m.n + (m.excluded ? ` (−${m.excluded})` : "") }),
        k.h("td", { class: "num", text: num(m.mean_a, digits) }), k.h("td", { class: "num", text: num(m.mean_b, digits) }),
        k.h("td", { class: "num", text: signed(m.delta, digits) }), k.h("td", { class: "num", text: ci }),
        k.h("td", { class: "num", text: pValue(m.p_value) }),
        k.h("td", { class: verdictClass(m.verdict), text: m.verdict }));
    });
    return table([["Metric"], ["n (left out)", 1], ["A", 1], ["B", 1], ["B − A", 1], [level, 1], ["p", 1], ["Verdict"]], rows);
  }

  function mcnemarLine(c) {
    const passed = c.metrics.find((m) => m.kind === "pass");
    if (!passed || !passed.mcnemar) return null;
    const t = passed.mcnemar;
    const ties = passed.ties ? `, ${passed.ties} tie(s) left out` : "";
    return k.h("p", { class: "eval-line" }, k.h("b", { text: "McNemar: " }),
      k.h("span", { class: "eval-worse", text: `${t.pass_to_fail} pass→fail` }), ", ",
      k.h("span", { class: "eval-better", text: `${t.fail_to_pass} fail→pass` }),
      ` (${t.both_pass} pass in both, ${t.both_fail} fail in both${ties}), exact p = ${pValue(t.p_value)}`);
  }

  function flipsTable(compared, here) {
    if (!compared.flips.length) return emptyNote("No case flipped between pass and fail.");
    const rows = compared.flips.map((f) => {
      const worse = f.direction === "pass_to_fail";
      const metrics = [...new Set([...Object.keys(f.scores), ...Object.keys(f.scores_b)])];
      return k.h("tr", { class: "eval-static" },
        k.h("td", { class: "item-key", text: f.case_id }),
        k.h("td", { class: worse ? "eval-worse" : "eval-better", text: worse ? "pass→fail" : "fail→pass" }),
        textCell(f.input), textCell(f.expected), textCell(f.output), textCell(f.output_b),
        k.h("td", { class: "eval-scores", text: metrics.map((m) => `${m} ${num(f.scores[m], 2)} → ${num(f.scores_b[m], 2)}`).join("\n") || "–" }),
        k.h("td", { class: "eval-traces" }, traceLink(f.trace_id, here, "The case's trace in run A", "trace A"),
          k.h("br"), traceLink(f.trace_id_b, here, "The case's trace in run B", "trace B")));
    });
    const more = compared.hidden_flips ? k.h("div", { class: "hint eval-more", text: `… and ${compared.hidden_flips} more (25 shown each way; every one in keel eval compare --json)` }) : null;
    return [table([["Case"], ["Flip"], ["Input"], ["Expected"], ["Output A"], ["Output B"], ["Scores A → B"], ["Traces"]], rows, "eval-flips"), more];
  }

  async function showCompare(mine, a, b) {
    const body = await k.api("evals/compare", { a, b });
    if (mine !== request) return;
    const compared = body.compared[0];
    const c = compared.comparison;
    const here = "#/evals/compare/" + encodeURIComponent(a) + "/" + encodeURIComponent(b);
    const drops = c.regressions;
    const rises = c.metrics.filter((m) => m.change === "rise").map((m) => m.metric);
    const verdict = drops.length
      ? k.h("span", { class: "badge error", id: "eval-verdict", text: "significant drop: " + drops.join(", ") })
      : rises.length ? k.h("span", { class: "badge ok", id: "eval-verdict", text: "no significant drop · better: " + rises.join(", ") })
        : k.h("span", { class: "badge pending", id: "eval-verdict", text: "no significant change" });
    const flips = c.pass_to_fail.length + c.fail_to_pass.length;
    k.replace(el(),
      head([`${c.variant_b} against ${c.variant_a} `, verdict], `B ${c.run_b} · baseline A ${c.run_a} · alpha ${c.alpha}`,
        [["Shared cases", String(c.shared)], ["Only in A / B", `${c.only_a.length} / ${c.only_b.length}`], ["Flipped", String(flips)]]),
      card("Runs", "A is the baseline", runsSummary(body.runs)),
      card("Paired comparison", "per case, B − A; repeats averaged per case first",
        c.notes.map((n) => k.h("p", { class: "eval-note", text: "Note: " + n })),
        forest(c), comparisonTable(c), mcnemarLine(c)),
      k.h("div", { class: "eval-grid" },
        card("Score distributions", "share of cases per score bin", distributions(body)),
        card("Cost vs quality", "mean per case", spend(body.spend.map((p) => ({
          label: body.runs[p.run].label, variant: body.runs[p.run].variant, color: color(p.run), current: false,
          quality: p.quality, cost: p.cost_per_case, latency: p.latency_p50_s,
        })), body.quality_label))),
      card("By tag", null, tagBars(body)),
      card("Flipped cases", `${c.pass_to_fail.length} pass→fail · ${c.fail_to_pass.length} fail→pass`, flipsTable(compared, here)));
  }

  // --- routing -------------------------------------------------------------------------------------

  async function open(hash, kit) {
    k = kit;
    const mine = ++request;
    k.clearError();
    const compareMatch = hash.match(/^#\/evals\/compare\/([^/]+)\/([^/]+)$/);
    const runMatch = hash.match(/^#\/evals\/(.+)$/);
    try {
      let running = false;
      if (compareMatch) await showCompare(mine, decodeURIComponent(compareMatch[1]), decodeURIComponent(compareMatch[2]));
      else if (runMatch) running = await showRun(mine, decodeURIComponent(runMatch[1]));
      else running = await showRuns(mine);
      if (mine !== request) return;
      k.markUpdated();
      // while a run runs, reload (unless another page, or another load of this one, came in between)
      if (running) setTimeout(() => { if (mine === request && location.hash === hash) open(hash, k); }, REFRESH_MS);
    } catch (error) {
      if (mine !== request) return;
      el().replaceChildren(k.h("button", { type: "button", class: "btn", text: "← Evals", onclick: () => { location.hash = "#/evals"; } }));
      k.showError(error);
    }
  }

  (window.keelPages = window.keelPages || []).push({
    view: "evals-view",
    nav: "evals",
    match: (hash) => hash === "#/evals" || hash.startsWith("#/evals/"),
    open,
  });
})();
