// keel dashboard: plain JavaScript, no build step, no dependencies.
// Reads /api/overview, /api/traces, /api/traces/{id}, /api/facets, /api/jobs and /api/jobs/{name}
// (the Evals page, static/evals.js, reads /api/evals*);
// draws its charts as SVG.
// The filters live in the page's query string (?session=sess-42&sort=cost), so a view can be linked.
// Every value from the store reaches the page through textContent, never as HTML.
"use strict";

(() => {
  const RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400 };
  const KEY_STORAGE = "keel.adminKey";
  const RANGE_STORAGE = "keel.range";
  const TRACE_LIMIT = 100; // one page of the trace list; "Load more" asks for the next one
  //: The filters kept in the query string, each an input of the filter bar (or the sort select).
  const URL_FILTERS = ["model", "key", "status", "q", "session", "user", "tag", "sort"];
  //: Latency spanning more than this factor (say 200 ms and a 397 s outlier) is drawn on a log scale.
  const LOG_SCALE_SPREAD = 50;
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    range: localStorage.getItem(RANGE_STORAGE) in RANGES ? localStorage.getItem(RANGE_STORAGE) : "24h",
    from: null, // epoch seconds of a custom range, or null
    to: null,
    model: "",
    key: "",
    status: "",
    q: "",
    session: "",
    user: "",
    tag: "",
    sort: "time",
    traces: [], // the pages loaded so far
    cursor: null, // the next page's cursor, null when there is none
    overview: null,
    trace: null,
    selected: null,
    returnTo: null, // the job (or eval) page a trace was opened from (its back button goes there)
    returnLabel: null, // that back button's text, when not "← Job"
  };

  const $ = (selector) => document.querySelector(selector);

  // --- DOM helpers ------------------------------------------------------------

  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") el.textContent = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
  }

  function fill(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  /** An HTML element: h("td", {class: "num"}, "42"). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    return fill(el, children);
  }

  /** Replace an element's children, skipping null ones (as h() does). */
  function replace(el, ...children) {
    el.replaceChildren();
    return fill(el, children);
  }

  /** An SVG element. */
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    return fill(el, children);
  }

  // --- formatting ---------------------------------------------------------------

  const intFormat = new Intl.NumberFormat();

  function fmtInt(n) {
    return n === null || n === undefined ? "–" : intFormat.format(n);
  }

  function fmtCompact(n) {
    if (n === null || n === undefined) return "–";
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
    if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(n >= 1e5 ? 0 : 1) + "k";
    return intFormat.format(Math.round(n * 100) / 100);
  }

  function fmtCost(usd) {
    if (usd === null || usd === undefined) return "–";
    if (usd === 0) return "$0";
    if (usd >= 100) return "$" + usd.toFixed(0);
    if (usd >= 1) return "$" + usd.toFixed(2);
    if (usd >= 0.01) return "$" + usd.toFixed(3);
    return "$" + usd.toPrecision(2);
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms >= 60000) return (ms / 60000).toFixed(1) + " min";
    if (ms >= 1000) return (ms / 1000).toFixed(ms >= 10000 ? 1 : 2) + " s";
    return (ms >= 10 ? Math.round(ms) : ms.toFixed(1)) + " ms";
  }

  function fmtPercent(ratio) {
    if (!ratio) return "0%";
    const p = ratio * 100;
    return (p >= 10 ? p.toFixed(0) : p.toFixed(1)) + "%";
  }

  /** A count over a range as a rate in the unit that gives a readable number. */
  function fmtRate(count, seconds) {
    for (const [unit, length] of [["second", 1], ["minute", 60], ["hour", 3600]]) {
      const rate = (count / seconds) * length;
      if (rate >= 1) return fmtCompact(+rate.toPrecision(3)) + " per " + unit;
    }
    return fmtCompact(+((count / seconds) * 86400).toPrecision(3)) + " per day";
  }

  function fmtDateTime(epoch) {
    return new Date(epoch * 1000).toLocaleString([], {
      month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  }

  /** A chart's time label: the clock for buckets within a day, the date beyond (UTC days). */
  function fmtBucket(epoch, bucketSeconds, rangeSeconds) {
    const d = new Date(epoch * 1000);
    if (bucketSeconds >= 86400) return d.toLocaleDateString([], { month: "short", day: "numeric", timeZone: "UTC" });
    if (rangeSeconds > 86400) return d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit" });
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function clip(text, max) {
    text = String(text);
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  function shortId(id) {
    return id.length > 12 ? "…" + id.slice(-12) : id;
  }

  // --- API ----------------------------------------------------------------------

  class AuthNeeded extends Error {
    constructor(status) {
      super(status === 403 ? "this key is not the admin key" : "the admin key is needed");
      this.status = status;
    }
  }

  async function api(path, params) {
    const url = new URL("api/" + path, document.baseURI);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== "" && value !== null && value !== undefined) url.searchParams.set(name, value);
    }
    const headers = { Accept: "application/json" };
    const key = localStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = "Bearer " + key;
    const response = await fetch(url, { headers });
    if (response.status === 401 || response.status === 403) throw new AuthNeeded(response.status);
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error && body.error.message;
      throw new Error(message || `${url.pathname} answered HTTP ${response.status}`);
    }
    return body;
  }

  function showError(error) {
    if (error instanceof AuthNeeded) {
      askForKey(error);
      return;
    }
    const banner = $("#banner");
    banner.textContent = "Could not load data: " + error.message;
    banner.hidden = false;
  }

  function clearError() {
    $("#banner").hidden = true;
  }

  function askForKey(error) {
    const dialog = $("#login");
    $("#login-reason").textContent = localStorage.getItem(KEY_STORAGE)
      ? "The saved key was refused (" + error.message + "). Enter the admin key of this keel server."
      : "The dashboard's data needs the admin key of this keel server.";
    if (!dialog.open) dialog.showModal();
    $("#login-key").focus();
  }

  // --- filters and range ------------------------------------------------------------

  function currentRange() {
    const now = Date.now() / 1000;
    if (state.from !== null || state.to !== null) {
      const until = state.to ?? now;
      return { since: state.from ?? until - RANGES[state.range], until };
    }
    return { since: now - RANGES[state.range], until: now };
  }

  function overviewParams() {
    const { since, until } = currentRange();
    return {
      since: since.toFixed(3), until: until.toFixed(3), model: state.model, key: state.key,
      session: state.session, user: state.user, tag: state.tag,
    };
  }

  function traceParams() {
    return { ...overviewParams(), status: state.status, q: state.q, sort: state.sort, limit: TRACE_LIMIT };
  }

  /** The filters from the query string (a shared link), into the state and the filter bar. */
  function readUrl() {
    const params = new URLSearchParams(location.search);
    for (const name of URL_FILTERS) {
      const value = params.get(name);
      if (value !== null) state[name] = value;
    }
    if (!["time", "latency", "cost"].includes(state.sort)) state.sort = "time";
    if (!["", "ok", "error"].includes(state.status)) state.status = "";
    for (const name of URL_FILTERS) $("#f-" + name).value = state[name]; // model and key: fillSelect adds theirs
  }

  /** The current filters into the query string, keeping the #/trace/... route. */
  function writeUrl() {
    const params = new URLSearchParams();
    for (const name of URL_FILTERS) {
      if (state[name] && !(name === "sort" && state[name] === "time")) params.set(name, state[name]);
    }
    const query = params.toString();
    history.replaceState(null, "", location.pathname + (query ? "?" + query : "") + location.hash);
  }

  function markRange() {
    const custom = state.from !== null || state.to !== null;
    for (const button of document.querySelectorAll("#ranges button")) {
      button.classList.toggle("active", !custom && button.dataset.range === state.range);
    }
  }

  function fillSelect(select, values, allLabel, wanted) {
    const current = wanted ?? select.value;
    select.replaceChildren(h("option", { value: "", text: allLabel }), ...values.map((v) => h("option", { value: v, text: v })));
    if (current && !values.includes(current)) select.append(h("option", { value: current, text: current }));
    select.value = current;
  }

  async function loadFacets() {
    const facets = await api("facets");
    fillSelect($("#f-model"), facets.models, "All models", state.model);
    fillSelect($("#f-key"), facets.keys, "All keys", state.key);
  }

  function epochFromInput(input) {
    return input.value ? new Date(input.value).getTime() / 1000 : null;
  }

  function bindFilters() {
    for (const button of document.querySelectorAll("#ranges button")) {
      button.addEventListener("click", () => {
        state.range = button.dataset.range;
        localStorage.setItem(RANGE_STORAGE, state.range);
        state.from = state.to = null;
        $("#f-from").value = $("#f-to").value = "";
        markRange();
        reloadAll();
      });
    }
    $("#f-model").addEventListener("change", (e) => { state.model = e.target.value; reloadAll(); });
    $("#f-key").addEventListener("change", (e) => { state.key = e.target.value; reloadAll(); });
    $("#f-status").addEventListener("change", (e) => { state.status = e.target.value; reloadTraces(); });
    $("#f-sort").addEventListener("change", (e) => { state.sort = e.target.value; reloadTraces(); });
    let typing = null;
    $("#f-q").addEventListener("input", (e) => {
      clearTimeout(typing);
      typing = setTimeout(() => { state.q = e.target.value.trim(); reloadTraces(); }, 300);
    });
    // session, user and tag are exact: they apply to the charts too, once the typing stops
    for (const name of ["session", "user", "tag"]) {
      $("#f-" + name).addEventListener("input", (e) => {
        clearTimeout(typing);
        typing = setTimeout(() => { state[name] = e.target.value.trim(); reloadAll(); }, 300);
      });
    }
    $("#more").addEventListener("click", loadMoreTraces);
    for (const id of ["#f-from", "#f-to"]) {
      $(id).addEventListener("change", () => {
        state.from = epochFromInput($("#f-from"));
        state.to = epochFromInput($("#f-to"));
        markRange();
        reloadAll();
      });
    }
    $("#filters").addEventListener("submit", (e) => e.preventDefault());
    $("#f-clear").addEventListener("click", () => {
      $("#filters").reset();
      Object.assign(state, { model: "", key: "", status: "", q: "", session: "", user: "", tag: "", from: null, to: null });
      markRange();
      reloadAll();
    });
    $("#refresh").addEventListener("click", route); // the current page, whichever it is
    $("#signout").addEventListener("click", () => {
      localStorage.removeItem(KEY_STORAGE);
      $("#signout").hidden = true;
      reloadAll();
    });
    $("#login-form").addEventListener("submit", () => {
      localStorage.setItem(KEY_STORAGE, $("#login-key").value.trim());
      $("#login-key").value = "";
      $("#signout").hidden = false;
      route();
    });
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => state.overview && renderCharts(state.overview), 150);
    });
  }

  async function reloadAll() {
    clearError();
    writeUrl();
    try {
      await Promise.all([loadFacets(), reloadOverview(), reloadTraces(true)]);
      $("#updated").textContent = "Updated " + new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    } catch (error) {
      showError(error);
    }
  }

  async function reloadOverview() {
    const overview = await api("overview", overviewParams());
    state.overview = overview;
    renderKpis(overview);
    renderCharts(overview);
  }

  let traceRequest = 0;

  async function reloadTraces(rethrow) {
    const mine = ++traceRequest; // a slower earlier answer must not overwrite a newer one
    writeUrl();
    try {
      const body = await api("traces", traceParams());
      if (mine !== traceRequest) return;
      state.traces = body.traces;
      state.cursor = body.next_cursor;
      renderTraces();
    } catch (error) {
      if (rethrow) throw error;
      showError(error);
    }
  }

  /** The next page after the last trace shown (keyset: the server continues after its cursor). */
  async function loadMoreTraces() {
    const mine = traceRequest; // new filters since the click: this page no longer belongs
    $("#more").disabled = true;
    try {
      const body = await api("traces", { ...traceParams(), cursor: state.cursor });
      if (mine !== traceRequest) return;
      state.traces = state.traces.concat(body.traces);
      state.cursor = body.next_cursor;
      renderTraces();
    } catch (error) {
      showError(error);
    } finally {
      $("#more").disabled = false;
    }
  }

  // --- KPI cards ---------------------------------------------------------------------

  function kpi(label, value, sub, bad) {
    return h("div", { class: "kpi" + (bad ? " bad" : "") },
      h("div", { class: "label", text: label }), h("div", { class: "value", text: value }),
      h("div", { class: "sub", text: sub || "\u00a0" }));
  }

  function renderKpis(o) {
    const t = o.totals;
    const rate = t.requests ? t.errors / t.requests : 0;
    const tokens = t.input_tokens + t.output_tokens;
    const avgCost = !t.requests ? "" : t.cost_usd !== null ? fmtCost(t.cost_usd / t.requests) + " per request" : "no cost recorded";
    replace($("#kpis"), 
      kpi("Requests", fmtInt(t.requests), fmtRate(t.requests, o.until - o.since)),
      kpi("Error rate", fmtPercent(rate), fmtInt(t.errors) + " errors", rate > 0.05),
      kpi("Cost", fmtCost(t.cost_usd), avgCost),
      kpi("Tokens", fmtCompact(tokens), fmtCompact(t.input_tokens) + " in · " + fmtCompact(t.output_tokens) + " out"),
      kpi("Latency p50", fmtMs(o.latency.p50_ms), "p90 " + fmtMs(o.latency.p90_ms)),
      kpi("Latency p95", fmtMs(o.latency.p95_ms), "p99 " + fmtMs(o.latency.p99_ms)),
    );
  }

  // --- charts ---------------------------------------------------------------------------

  const tooltip = () => $("#tooltip");

  /** Show `lines` ([label, value] pairs or strings) next to the pointer while it is over `el`. */
  function withTip(el, lines) {
    el.addEventListener("mouseenter", () => {
      tooltip().replaceChildren(...lines.map((line, i) =>
        h("div", null, Array.isArray(line) ? [line[0] + ": ", h("b", { text: line[1] })] : i === 0 ? h("b", { text: line }) : line)));
      tooltip().hidden = false;
    });
    el.addEventListener("mousemove", (e) => {
      const tip = tooltip();
      const x = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
      tip.style.left = x + "px";
      tip.style.top = e.clientY + 14 + "px";
    });
    el.addEventListener("mouseleave", () => { tooltip().hidden = true; });
    return el;
  }

  /**
   * An axis from 0 to at least `value` in at most four round steps (1, 2, 2.5 or 5 times a power
   * of ten); counts (`integer`) get whole steps.
   */
  function niceScale(value, integer) {
    if (!(value > 0)) return { max: integer ? 4 : 1, step: integer ? 1 : 0.25 };
    const raw = value / 4;
    const power = 10 ** Math.floor(Math.log10(raw));
    const factors = integer && power < 10 ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
    const step = Math.max(integer ? 1 : 0, factors.map((f) => f * power).find((f) => f >= raw));
    return { max: Math.ceil(value / step - 1e-9) * step, step };
  }

  /** Milliseconds on an axis: short, and no decimals that do not say anything. */
  function fmtAxisMs(ms) {
    if (ms === 0) return "0";
    if (ms >= 1000) return +(ms / 1000).toFixed(2) + " s";
    return +ms.toFixed(ms < 1 ? 2 : 1) + " ms";
  }

  function fmtAxisCost(usd) {
    return usd === 0 ? "$0" : fmtCost(usd);
  }

  function chartBox(el, height) {
    const width = Math.max(260, Math.floor(el.clientWidth || el.parentElement.clientWidth || 400));
    return { width, height };
  }

  function svgRoot(width, height, label) {
    return s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "chart-svg", role: "img", "aria-label": label });
  }

  function empty(el, message) {
    el.replaceChildren(h("div", { class: "empty", text: message || "No model calls in this range" }));
  }

  /** Horizontal grid lines and y labels for a scale over `plot`. */
  function yAxis(svg, plot, scale, format) {
    for (let value = 0; value <= scale.max + 1e-9; value += scale.step) {
      const y = plot.top + plot.height - (value / scale.max) * plot.height;
      svg.append(s("line", { class: value ? "grid-line" : "axis-line", x1: plot.left, x2: plot.left + plot.width, y1: y, y2: y }));
      svg.append(s("text", { x: plot.left - 6, y: y + 4, "text-anchor": "end", text: format(value) }));
    }
  }

  /** Labels under `count` slots, thinned so that they do not run into each other. */
  function xLabels(svg, plot, count, labelAt) {
    const slot = plot.width / count;
    const widest = Math.max(...Array.from({ length: Math.min(count, 3) }, (_, i) => labelAt(i).length));
    const step = Math.max(1, Math.ceil((widest * 6.4 + 14) / slot));
    const right = plot.left + plot.width + 8; // the svg's width
    let taken = -Infinity; // where the last label drawn ends
    for (let i = 0; i < count; i += step) {
      const half = labelAt(i).length * 3.2; // keep a label under the last slot inside the chart
      const x = Math.min(Math.max(plot.left + i * slot + slot / 2, half), right - half);
      if (x - half < taken + 6) continue; // pushed inside, the last label would run into the one before
      taken = x + half;
      svg.append(s("text", { x, y: plot.top + plot.height + 16, "text-anchor": "middle", text: labelAt(i) }));
    }
  }

  function xAxis(svg, plot, series, bucketSeconds, rangeSeconds) {
    xLabels(svg, plot, series.length, (i) => fmtBucket(series[i].start, bucketSeconds, rangeSeconds));
  }

  function plotArea(width, height) {
    return { left: 46, top: 10, width: width - 46 - 8, height: height - 10 - 24 };
  }

  /** Stacked bars over time: `parts` are [field, class] from the bottom up. */
  function stackedBars(el, o, parts, tipFor, format) {
    const series = o.series;
    const totals = series.map((b) => parts.reduce((sum, [field]) => sum + (b[field] || 0), 0));
    if (!totals.some((v) => v > 0)) return empty(el);
    const { width, height } = chartBox(el, 200);
    const plot = plotArea(width, height);
    const scale = niceScale(Math.max(...totals), true);
    const max = scale.max;
    const svg = svgRoot(width, height, el.parentElement.querySelector("h2").textContent);
    yAxis(svg, plot, scale, format);
    const slot = plot.width / series.length;
    const gap = slot > 6 ? Math.min(slot * 0.2, 6) : 0.5;
    series.forEach((b, i) => {
      const x = plot.left + i * slot + gap / 2;
      let y = plot.top + plot.height;
      for (const [field, cls] of parts) {
        const barHeight = ((b[field] || 0) / max) * plot.height;
        if (barHeight > 0) {
          y -= barHeight;
          svg.append(s("rect", { class: cls, x, y, width: Math.max(1, slot - gap), height: barHeight, rx: slot > 8 ? 2 : 0 }));
        }
      }
      svg.append(withTip(s("rect", { class: "hit", x: plot.left + i * slot, y: plot.top, width: slot, height: plot.height }), tipFor(b)));
    });
    xAxis(svg, plot, series, o.bucket_seconds, o.until - o.since);
    el.replaceChildren(svg);
  }

  function bucketTitle(b, o) {
    const end = b.start + o.bucket_seconds;
    const opts = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
    return new Date(b.start * 1000).toLocaleString([], opts) + " – " + new Date(end * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function renderRequests(el, o) {
    const series = o.series.map((b) => ({ ...b, ok: b.requests - b.errors }));
    stackedBars(el, { ...o, series }, [["ok", "bar-ok"], ["errors", "bar-err"]], (b) => [
      bucketTitle(b, o), ["Requests", fmtInt(b.requests)], ["Errors", `${fmtInt(b.errors)} (${fmtPercent(b.requests ? b.errors / b.requests : 0)})`],
      ["Cost", fmtCost(b.cost_usd)],
    ], fmtCompact);
  }

  function renderTokens(el, o) {
    stackedBars(el, o, [["input_tokens", "bar-tin"], ["output_tokens", "bar-tout"]], (b) => [
      bucketTitle(b, o), ["Input tokens", fmtInt(b.input_tokens)], ["Output tokens", fmtInt(b.output_tokens)],
    ], fmtCompact);
  }

  /**
   * How latencies map to [0, 1] along an axis, with the ticks to draw. Linear from 0 while the values are
   * of one order; once the slowest is LOG_SCALE_SPREAD times the fastest (one 397 s outlier among
   * 200 ms calls), logarithmic over whole powers of ten, so the usual calls do not sit flat on the axis.
   */
  function latencyScale(values) {
    const positive = values.filter((v) => v > 0);
    const max = Math.max(...positive, 0);
    const min = Math.min(...positive);
    if (!positive.length || max / min < LOG_SCALE_SPREAD) {
      const scale = niceScale(max);
      const ticks = [];
      for (let v = 0; v <= scale.max + 1e-9; v += scale.step) ticks.push(v);
      return { log: false, ticks, at: (v) => (v || 0) / scale.max };
    }
    const lo = Math.floor(Math.log10(min));
    const hi = Math.max(lo + 1, Math.ceil(Math.log10(max)));
    const ticks = [];
    for (let k = lo; k <= hi; k++) ticks.push(10 ** k);
    return { log: true, ticks, at: (v) => (v > 0 ? Math.max(0, (Math.log10(v) - lo) / (hi - lo)) : 0) };
  }

  /** Show or hide the "log scale" note in a chart's title. */
  function noteScale(el, scale) {
    el.parentElement.querySelector(".scale-note").hidden = !scale.log;
  }

  /** p50 and p95 latency per bucket as two lines; a bucket with no calls breaks the line. */
  function renderLatencyOverTime(el, o) {
    const series = o.series;
    const values = series.flatMap((b) => [b.p50_ms, b.p95_ms]).filter((v) => v !== null);
    const scale = latencyScale(values);
    noteScale(el, scale);
    if (!values.length) return empty(el);
    const { width, height } = chartBox(el, 200);
    const plot = plotArea(width, height);
    const svg = svgRoot(width, height, "Latency over time" + (scale.log ? " (log scale)" : ""));
    svg.classList.toggle("log-scale", scale.log);
    const yOf = (v) => plot.top + plot.height - scale.at(v) * plot.height;
    for (const value of scale.ticks) {
      const y = yOf(value);
      svg.append(s("line", { class: value === scale.ticks[0] ? "axis-line" : "grid-line", x1: plot.left, x2: plot.left + plot.width, y1: y, y2: y }));
      svg.append(s("text", { x: plot.left - 6, y: y + 4, "text-anchor": "end", text: fmtAxisMs(value) }));
    }
    const slot = plot.width / series.length;
    const xy = (i, v) => [plot.left + i * slot + slot / 2, yOf(v)];
    for (const [field, cls] of [["p50_ms", "p50"], ["p95_ms", "p95"]]) {
      let path = "";
      let pen = false;
      series.forEach((b, i) => {
        if (b[field] === null) { pen = false; return; }
        const [x, y] = xy(i, b[field]);
        path += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
        pen = true;
        svg.append(s("circle", { class: "dot-" + cls, cx: x, cy: y, r: series.length > 40 ? 1.8 : 2.8 }));
      });
      svg.prepend(s("path", { class: "line-" + cls, d: path }));
    }
    svg.prepend(...[...svg.querySelectorAll("line, text")]); // grid below the lines
    series.forEach((b, i) => {
      if (!b.requests) return;
      svg.append(withTip(s("rect", { class: "hit", x: plot.left + i * slot, y: plot.top, width: slot, height: plot.height }), [
        bucketTitle(b, o), ["p50", fmtMs(b.p50_ms)], ["p95", fmtMs(b.p95_ms)], ["Requests", fmtInt(b.requests)],
      ]));
    });
    xAxis(svg, plot, series, o.bucket_seconds, o.until - o.since);
    el.replaceChildren(svg);
  }

  function renderCostByDay(el, o) {
    const days = o.by_day;
    if (!days.some((d) => d.requests)) return empty(el);
    const none = noCost(days);
    if (none) return empty(el, none);
    const { width, height } = chartBox(el, 200);
    const plot = plotArea(width, height);
    const scale = niceScale(Math.max(...days.map((d) => d.cost_usd || 0)));
    const max = scale.max;
    const svg = svgRoot(width, height, "Cost by day");
    yAxis(svg, plot, scale, fmtAxisCost);
    const slot = plot.width / days.length;
    const barWidth = Math.min(48, slot * 0.7);
    days.forEach((d, i) => {
      const barHeight = ((d.cost_usd || 0) / max) * plot.height;
      const x = plot.left + i * slot + (slot - barWidth) / 2;
      if (barHeight > 0) svg.append(s("rect", { class: "bar-cost", x, y: plot.top + plot.height - barHeight, width: barWidth, height: barHeight, rx: 2 }));
      svg.append(withTip(s("rect", { class: "hit", x: plot.left + i * slot, y: plot.top, width: slot, height: plot.height }), [
        d.name + " (UTC)", ["Cost", fmtCost(d.cost_usd)], ["Requests", fmtInt(d.requests)], ["Errors", fmtInt(d.errors)],
      ]));
    });
    const dayLabel = (i) => new Date(days[i].name + "T00:00:00Z").toLocaleDateString([], { month: "short", day: "numeric", timeZone: "UTC" });
    xLabels(svg, plot, days.length, dayLabel);
    el.replaceChildren(svg);
  }

  /**
   * Horizontal bars, one row per item: label, bar, value. `value(item)` sizes the bar,
   * `text(item)` is printed after it, `tip(item)` is shown on hover.
   */
  function horizontalBars(el, items, { value, text, tip, barClass, label }) {
    if (!items.length) return empty(el);
    const rows = items.slice(0, 10);
    const row = 28;
    const { width } = chartBox(el, 0);
    const height = rows.length * row + 4;
    const labelWidth = Math.min(150, width * 0.34);
    const valueWidth = 96;
    const barSpace = width - labelWidth - valueWidth - 12;
    const max = Math.max(...rows.map(value)) || 1;
    const svg = svgRoot(width, height, el.parentElement.querySelector("h2").textContent);
    rows.forEach((item, i) => {
      const y = i * row + 4;
      const name = label(item);
      svg.append(s("g", null, s("title", { text: name }), s("text", { class: "label", x: 0, y: y + 15, text: clip(name, Math.floor(labelWidth / 7)) })));
      svg.append(s("rect", { class: "bar-track", x: labelWidth, y: y + 4, width: barSpace, height: 14, rx: 3 }));
      const barWidth = (value(item) / max) * barSpace;
      if (barWidth > 0) svg.append(s("rect", { class: barClass(item), x: labelWidth, y: y + 4, width: Math.max(2, barWidth), height: 14, rx: 3 }));
      svg.append(s("text", { class: "value", x: width, y: y + 15, "text-anchor": "end", text: text(item) }));
      svg.append(withTip(s("rect", { class: "hit", x: 0, y, width, height: row }), tip(item)));
    });
    if (items.length > rows.length) el.replaceChildren(svg, h("div", { class: "hint", text: `and ${items.length - rows.length} more` }));
    else el.replaceChildren(svg);
  }

  /**
   * Why a cost chart has nothing to draw, or null when it has: no call had a known price (a model with
   * no price configured, calls that failed before an answer) or every priced call cost nothing.
   */
  function noCost(groups) {
    const called = groups.filter((g) => g.requests);
    if (!called.length) return null;
    if (called.every((g) => g.cost_usd === null)) return "No cost recorded: no call in this range has a known price";
    if (called.every((g) => !g.cost_usd)) return "No cost: every priced call in this range cost $0";
    return null;
  }

  function costBars(el, groups, labelFor) {
    const none = noCost(groups);
    if (none) return empty(el, none); // never fall back to drawing requests as if they were money
    horizontalBars(el, groups, {
      value: (g) => g.cost_usd || 0,
      text: (g) => (g.cost_usd === null ? "no price" : fmtCost(g.cost_usd)),
      barClass: () => "bar-cost",
      label: labelFor,
      tip: (g) => [labelFor(g), ["Cost", fmtCost(g.cost_usd)], ["Requests", fmtInt(g.requests)],
        ["Errors", fmtInt(g.errors)], ["Tokens", fmtInt(g.input_tokens) + " in · " + fmtInt(g.output_tokens) + " out"]],
    });
  }

  function renderErrors(el, o) {
    const total = o.totals.requests;
    $("#error-rate").textContent = total ? fmtPercent(o.totals.errors / total) + " of " + fmtInt(total) + " calls" : "";
    if (total && !o.errors.length) return empty(el, "No errors in this range");
    horizontalBars(el, o.errors, {
      value: (e) => e.count,
      text: (e) => fmtInt(e.count) + " · " + fmtPercent(e.rate),
      barClass: () => "bar-err",
      label: (e) => e.error_type,
      tip: (e) => [e.error_type, ["Count", fmtInt(e.count)], ["Share of calls", fmtPercent(e.rate)], clip(e.example || "", 80)],
    });
  }

  /** Four thin bars (p50, p90, p95, p99) per model on one shared scale (logarithmic for a wide spread). */
  function renderLatencyByModel(el, o) {
    const models = o.latency_by_model.slice(0, 8);
    const keys = [["p50_ms", "q50", "p50"], ["p90_ms", "q90", "p90"], ["p95_ms", "q95", "p95"], ["p99_ms", "q99", "p99"]];
    const scale = latencyScale(models.flatMap((m) => keys.map(([field]) => m[field])).filter((v) => v !== null));
    noteScale(el, scale);
    if (!models.length) return empty(el);
    const { width } = chartBox(el, 0);
    const group = 4 * 7 + 12;
    const height = models.length * group + 22;
    const labelWidth = Math.min(150, width * 0.3);
    const barSpace = width - labelWidth - 84;
    const svg = svgRoot(width, height, "Latency percentiles by model" + (scale.log ? " (log scale)" : ""));
    svg.classList.toggle("log-scale", scale.log);
    // every tick gets its grid line; labels skip ticks where they would run into each other
    const every = Math.ceil(64 / Math.max(1, barSpace / Math.max(1, scale.ticks.length - 1)));
    scale.ticks.forEach((value, i) => {
      const x = labelWidth + scale.at(value) * barSpace;
      svg.append(s("line", { class: "grid-line", x1: x, x2: x, y1: 0, y2: height - 18 }));
      if ((scale.ticks.length - 1 - i) % every) return; // count from the top tick: the slowest stays labelled
      svg.append(s("text", { x, y: height - 4, "text-anchor": i ? "middle" : "start", text: fmtAxisMs(value) }));
    });
    models.forEach((m, i) => {
      const y = i * group + 4;
      svg.append(s("g", null, s("title", { text: m.name }), s("text", { class: "label", x: 0, y: y + 17, text: clip(m.name, Math.floor(labelWidth / 7)) })));
      keys.forEach(([field, cls], k) => {
        const w = scale.at(m[field]) * barSpace;
        svg.append(s("rect", { class: cls, x: labelWidth, y: y + k * 7, width: Math.max(1, w), height: 6, rx: 1.5 }));
      });
      svg.append(s("text", { x: labelWidth + barSpace + 8, y: y + 17 }, "p95 ", s("tspan", { class: "value", text: fmtMs(m.p95_ms) })));
      svg.append(withTip(s("rect", { class: "hit", x: 0, y: y - 3, width, height: group }), [
        m.name, ...keys.map(([field, , name]) => [name, fmtMs(m[field])]), ["Requests", fmtInt(m.requests)],
      ]));
    });
    el.replaceChildren(svg);
  }

  function renderCharts(o) {
    tooltip().hidden = true; // its bar may be gone
    const chart = (id) => $(id + " .chart");
    renderRequests(chart("#chart-requests"), o);
    renderErrors(chart("#chart-errors"), o);
    renderLatencyOverTime(chart("#chart-latency-time"), o);
    renderLatencyByModel(chart("#chart-latency-model"), o);
    renderTokens(chart("#chart-tokens"), o);
    renderCostByDay(chart("#chart-cost-day"), o);
    costBars(chart("#chart-cost-model"), o.by_model, (g) => g.name);
    costBars(chart("#chart-cost-key"), o.by_key, (g) => g.name ?? "(no key)");
  }

  // --- trace list -------------------------------------------------------------------------

  function statusBadge(status, errorType) {
    return h("span", { class: "badge " + (status === "error" ? "error" : "ok"), text: status === "error" ? errorType || "error" : "ok" });
  }

  function traceRow(t) {
    const tokens = t.input_tokens || t.output_tokens ? fmtInt(t.input_tokens) + " → " + fmtInt(t.output_tokens) : "–";
    const preview = h("td", { class: "preview" },
      h("span", { class: "in", text: clip(t.input_preview || "–", 90) }), h("span", { class: "arrow", text: "→" }),
      t.status === "error" && !t.output_preview ? h("span", { text: clip(t.error_message || "", 90) }) : clip(t.output_preview || "–", 90));
    const childErrors = t.errors && t.status !== "error" ? h("span", { class: "hint", text: ` ${t.errors} failed span${t.errors > 1 ? "s" : ""}` }) : null;
    const row = h("tr", { class: "trace-row", "data-trace-id": t.trace_id, tabindex: 0 },
      h("td", { class: "muted", text: fmtDateTime(t.start_time) }),
      h("td", null, h("span", { text: t.name }), t.spans > 1 ? h("span", { class: "tag", style: "margin-left:6px", text: t.spans + " spans" }) : null),
      h("td", null, t.model ? h("span", { class: "tag", text: t.model }) : "–",
        t.models > 1 ? h("span", { class: "hint", title: t.models + " models", text: " +" + (t.models - 1) }) : null),
      h("td", { class: "muted", text: t.api_key ?? "–" }),
      h("td", null, statusBadge(t.status, t.error_type), childErrors),
      h("td", { class: "num", text: fmtMs(t.duration_ms) }),
      h("td", { class: "num", text: tokens }),
      h("td", { class: "num", text: fmtCost(t.cost_usd) }),
      preview);
    const open = () => { location.hash = "#/trace/" + encodeURIComponent(t.trace_id); };
    row.addEventListener("click", open);
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    return row;
  }

  function renderTraces() {
    const traces = state.traces;
    const body = $("#traces tbody");
    if (!traces.length) {
      body.replaceChildren(h("tr", { class: "empty-row" }, h("td", { colspan: 9, text: "No traces match these filters." })));
    } else {
      body.replaceChildren(...traces.map(traceRow));
    }
    const order = { time: "newest", latency: "slowest", cost: "costliest" }[state.sort];
    $("#trace-count").textContent = state.cursor
      ? `${order} ${fmtInt(traces.length)} · more below`
      : `${fmtInt(traces.length)} trace${traces.length === 1 ? "" : "s"}`;
    $("#more").hidden = !state.cursor;
  }

  // --- trace view -------------------------------------------------------------------------

  /** Spans in tree order (depth first, children by start time) with their depth and tree prefix. */
  function spanTree(spans) {
    const ids = new Set(spans.map((sp) => sp.span_id));
    const children = new Map();
    for (const sp of spans) {
      const parent = sp.parent_id && ids.has(sp.parent_id) ? sp.parent_id : null;
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(sp);
    }
    for (const list of children.values()) list.sort((a, b) => a.start_time - b.start_time);
    const ordered = [];
    const walk = (parent, depth, prefix) => {
      const list = children.get(parent) || [];
      list.forEach((sp, i) => {
        const last = i === list.length - 1;
        ordered.push({ span: sp, depth, guide: depth ? prefix + (last ? "└ " : "├ ") : "" });
        walk(sp.span_id, depth + 1, depth ? prefix + (last ? "  " : "│ ") : "");
      });
    };
    walk(null, 0, "");
    return ordered;
  }

  function opClass(span) {
    return span.status === "error" ? "is-error" : span.operation === "chat" ? "op-chat" : span.operation === "embeddings" ? "op-embeddings" : "op-other";
  }

  function traceTotals(spans) {
    const calls = spans.filter((sp) => sp.operation === "chat" || sp.operation === "embeddings");
    const sum = (field) => calls.reduce((total, sp) => total + (sp[field] || 0), 0);
    const priced = calls.some((sp) => sp.cost_usd !== null && sp.cost_usd !== undefined);
    const start = Math.min(...spans.map((sp) => sp.start_time));
    const end = Math.max(...spans.map((sp) => sp.end_time));
    return { start, end, ms: (end - start) * 1000, input: sum("input_tokens"), output: sum("output_tokens"), cost: priced ? sum("cost_usd") : null, calls: calls.length };
  }

  function renderTraceHead(trace, totals) {
    const root = spanTree(trace.spans)[0].span;
    replace($("#trace-name"), root.name, " ", statusBadge(root.status, root.error_type));
    $("#trace-id").textContent = trace.trace_id;
    const stat = (label, value) => h("div", null, h("dt", { text: label }), h("dd", { text: value }));
    replace($("#trace-stats"), 
      stat("Started", fmtDateTime(totals.start)), stat("Duration", fmtMs(totals.ms)),
      stat("Spans", fmtInt(trace.spans.length)), stat("Model calls", fmtInt(totals.calls)),
      stat("Tokens", fmtInt(totals.input) + " → " + fmtInt(totals.output)), stat("Cost", fmtCost(totals.cost)),
      ragDebugStat(trace.spans, stat));
  }

  /** The RAG debugger's class of an evaluation case (`keel rag debug`), newest first: "RAG debug: retrieval miss". */
  function ragDebugStat(spans, stat) {
    const labelled = spans.filter((sp) => sp.attributes && sp.attributes["keel.rag.debug.class"]);
    if (!labelled.length) return null;
    const at = (sp) => sp.attributes["keel.rag.debug.at"] || sp.start_time;
    const newest = labelled.reduce((a, b) => (at(b) >= at(a) ? b : a));
    const item = stat("RAG debug", newest.attributes["keel.rag.debug.class"]);
    item.classList.add("rag-debug");
    item.title = newest.attributes["keel.rag.debug.rule"] || "";
    return item;
  }

  /** The online scores ([evals.online]) of one span of a trace. */
  function spanScores(trace, spanId) {
    return (trace.scores || []).filter((s) => s.span_id === spanId);
  }

  function scoreText(s) {
    if (s.value === null || s.value === undefined) return "errored: " + (s.error || "?");
    return s.value.toFixed(3) + (s.spread === null || s.spread === undefined ? "" : " (spread " + s.spread.toFixed(3) + ")");
  }

  /** "2 scores" beside a scored span's name; its tooltip lists them. */
  function scoreChip(scores) {
    if (!scores.length) return null;
    const chip = h("span", { class: "tag score-chip", style: "flex-shrink:0;margin-left:6px;font-size:11px",
      text: scores.length + (scores.length === 1 ? " score" : " scores") });
    chip.title = scores.map((s) => s.scorer + ": " + scoreText(s)).join("\n");
    return chip;
  }

  /** The selected span's online scores: scorer, value (or errored, with its error), spread, when scored. */
  function renderOnlineScores(span) {
    const scores = spanScores(state.trace, span.span_id);
    if (!scores.length) return null;
    const rows = scores.map((s) => {
      const errored = s.value === null || s.value === undefined;
      return h("tr", { "data-scorer": s.scorer },
        h("td", { text: s.scorer }),
        h("td", { class: errored ? "errored" : "", style: errored ? "color:var(--err)" : "", text: scoreText(s) }),
        h("td", { text: s.model_version + " / " + s.prompt_version }),
        h("td", { text: "scored " + fmtDateTime(s.scored_at) }));
    });
    return h("div", null,
      h("div", { class: "section-title", text: "Online scores" }),
      h("table", { class: "attrs online-scores" }, h("tbody", null, rows)));
  }

  function renderWaterfall(trace, totals) {
    const total = Math.max(totals.end - totals.start, 1e-6);
    const ticks = h("div", { class: "wf-ticks" }, [0, 0.25, 0.5, 0.75, 1].map((f) => h("span", { style: `left:${f * 100}%`, text: fmtAxisMs(+(f * total * 1000).toPrecision(2)) })));
    const rows = spanTree(trace.spans).map(({ span, guide }) => {
      const left = ((span.start_time - totals.start) / total) * 100;
      const width = Math.max(((span.end_time - span.start_time) / total) * 100, 0.4);
      // the duration goes inside a wide bar, else beside it, on whichever side has room
      const inside = width > 22;
      const labelAt = inside ? `left:${left + 0.8}%` : left + width > 78 ? `right:${100 - left + 1}%` : `left:${left + width + 1}%`;
      const row = h("div", { class: "span-row", "data-span-id": span.span_id, tabindex: 0 },
        h("div", { class: "span-name" },
          guide ? h("span", { class: "tree", text: guide }) : null,
          h("span", { class: "dot " + opClass(span) }),
          h("span", { class: "nm", title: span.name, text: span.name }),
          scoreChip(spanScores(trace, span.span_id))),
        h("div", { class: "span-track" },
          h("div", { class: "span-bar " + opClass(span), style: `left:${left}%;width:${width}%` }),
          h("span", { class: "span-bar-label" + (inside ? " inside" : ""), style: labelAt, text: fmtMs(span.duration_ms) })));
      row.addEventListener("click", () => selectSpan(span.span_id));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter") selectSpan(span.span_id); });
      return row;
    });
    $("#waterfall").replaceChildren(h("div", { class: "wf-scale" }, h("span", { text: "Span" }), ticks), ...rows);
    $("#span-count").textContent = trace.spans.length + (trace.spans.length === 1 ? " span" : " spans");
  }

  function messageBlock(role, content, extraClass) {
    return h("div", { class: "msg " + (extraClass || role) }, h("div", { class: "role", text: role }), h("pre", { class: "content", text: content }));
  }

  function contentText(content) {
    if (content === null || content === undefined) return "";
    if (typeof content === "string") return content;
    if (Array.isArray(content)) return content.map((p) => (p && p.type === "text" ? p.text : JSON.stringify(p))).join("\n");
    return JSON.stringify(content, null, 2);
  }

  function toolCallsText(calls) {
    return calls.map((c) => `${c.name || (c.function && c.function.name)}(${c.arguments || (c.function && c.function.arguments) || ""})`).join("\n");
  }

  function json(value) {
    return h("pre", { class: "json", text: typeof value === "string" ? value : JSON.stringify(value, null, 2) });
  }

  function renderInput(input) {
    if (input === null || input === undefined) return [h("p", { class: "hint", text: "No input recorded." })];
    if (input && Array.isArray(input.messages)) {
      const blocks = input.messages.map((m) => {
        let text = contentText(m.content);
        if (m.tool_calls && m.tool_calls.length) text += (text ? "\n" : "") + "→ " + toolCallsText(m.tool_calls);
        return messageBlock(m.role || "message", text || "(empty)");
      });
      if (input.tools) blocks.push(h("div", { class: "hint", text: "Tools offered: " + input.tools.map((t) => (t.function ? t.function.name : t.name)).join(", ") }));
      if (input.response_format) blocks.push(h("div", { class: "hint", text: "Structured output: " + (input.response_format.name || "schema") }));
      return blocks;
    }
    return [json(input)];
  }

  function renderOutput(output, span) {
    if (output === null || output === undefined) {
      const invalid = span.attributes["keel.structured.invalid_outputs"];
      if (span.status === "error" && Array.isArray(invalid) && invalid.length) {
        return [h("p", { class: "hint", text: "No valid output: every answer failed the schema (below)." })];
      }
      return [h("p", { class: "hint", text: span.status === "error" ? "No output: the span failed." : "No output recorded." })];
    }
    if (output && typeof output === "object" && "text" in output) {
      const blocks = [];
      if (output.text || !(output.tool_calls && output.tool_calls.length)) blocks.push(messageBlock("assistant", output.text || "(empty)", "output"));
      if (output.tool_calls && output.tool_calls.length) blocks.push(messageBlock("tool calls", toolCallsText(output.tool_calls), "output"));
      return blocks;
    }
    return [json(output)];
  }

  /** The answers a structured call re-asked for (or gave up on), each with why it did not validate. */
  function renderInvalidOutputs(invalid) {
    if (!Array.isArray(invalid) || !invalid.length) return null;
    const tries = invalid.map((entry) => h("div", { class: "invalid" },
      h("div", { class: "role", text: "Try " + (entry.try ?? "?") + " · did not validate" }),
      entry.output === undefined
        ? h("p", { class: "hint", text: "The answer is not kept (content capture is off)." })
        : h("pre", { class: "content", text: entry.output || "(empty)" }),
      entry.output_chars ? h("div", { class: "hint", text: `clipped: the answer had ${fmtInt(entry.output_chars)} characters` }) : null,
      h("div", { class: "why", text: entry.error || "" })));
    return [h("div", { class: "section-title", text: `Invalid structured outputs (${invalid.length})` }), h("div", { class: "io invalid-outputs" }, tries)];
  }

  function attributeRows(attributes) {
    return Object.keys(attributes).sort().map((name) => {
      const value = attributes[name];
      return h("tr", null, h("td", { text: name }), h("td", { text: typeof value === "string" ? value : JSON.stringify(value) }));
    });
  }

  function renderSpanDetail(span) {
    const meta = (label, value) => h("div", null, h("dt", { text: label }), h("dd", { title: String(value), text: value }));
    const offset = (span.start_time - traceTotals(state.trace.spans).start) * 1000;
    const tokens = span.input_tokens !== null && span.input_tokens !== undefined ? fmtInt(span.input_tokens) + " → " + fmtInt(span.output_tokens) : "–";
    replace($("#span-detail"), 
      h("h2", { class: "span-title" }, span.name, statusBadge(span.status, span.error_type)),
      h("dl", { class: "meta" },
        meta("Latency", fmtMs(span.duration_ms)), meta("Starts at", "+" + fmtMs(offset)),
        meta("Tokens in → out", tokens), meta("Cost", fmtCost(span.cost_usd)),
        meta("Model", span.model || "–"), meta("Provider", span.provider || "–"),
        meta("Operation", span.operation || "–"), meta("Attempts", span.attempts ?? "–"),
        meta("Key", span.api_key || "–"), meta("Started", fmtDateTime(span.start_time)),
        meta("Span id", span.span_id), meta("Parent", span.parent_id || "–"),
        filterLink("Session", "session", span.attributes["keel.session"]),
        filterLink("User", "user", span.attributes["keel.user"])),
      span.status === "error" ? h("div", { class: "error-box" }, h("b", { text: span.error_type || "error" }), span.error_message || "") : null,
      renderOnlineScores(span),
      h("div", { class: "section-title", text: "Input" }), h("div", { class: "io input" }, renderInput(span.input)),
      h("div", { class: "section-title", text: "Output" }), h("div", { class: "io output" }, renderOutput(span.output, span)),
      renderInvalidOutputs(span.attributes["keel.structured.invalid_outputs"]),
      h("div", { class: "section-title", text: "Attributes" }), h("table", { class: "attrs" }, h("tbody", null, attributeRows(span.attributes))));
  }

  /** A span's session or user as a link to the trace list filtered by it (null when the span has none). */
  function filterLink(label, name, value) {
    if (value === null || value === undefined || value === "") return null;
    const href = "?" + new URLSearchParams({ [name]: String(value) }).toString();
    return h("div", null, h("dt", { text: label }),
      h("dd", { title: "Traces of this " + name }, h("a", { class: "filter-link", href, text: String(value) })));
  }

  function selectSpan(spanId) {
    const span = state.trace.spans.find((sp) => sp.span_id === spanId);
    if (!span) return;
    state.selected = spanId;
    for (const row of document.querySelectorAll(".span-row")) row.classList.toggle("selected", row.dataset.spanId === spanId);
    renderSpanDetail(span);
  }

  /** The span to show first: the first model call (what a reader usually wants), else the root. */
  function firstSpan(spans) {
    const ordered = spanTree(spans).map((x) => x.span);
    return (ordered.find((sp) => sp.operation === "chat" && sp.input) || ordered[0]).span_id;
  }

  async function openTrace(traceId) {
    clearError();
    try {
      const trace = await api("traces/" + encodeURIComponent(traceId));
      state.trace = trace;
      const totals = traceTotals(trace.spans);
      renderTraceHead(trace, totals);
      renderWaterfall(trace, totals);
      const keep = trace.spans.some((sp) => sp.span_id === state.selected);
      selectSpan(keep ? state.selected : firstSpan(trace.spans));
    } catch (error) {
      showError(error);
    }
  }

  // --- jobs ---------------------------------------------------------------------------------

  const JOB_REFRESH_MS = 2000; // a page showing a running job reloads it this often
  let jobTimer = null;
  let jobRequest = 0;

  function jobBadge(status) {
    const cls = { running: "running", done: "ok", failed: "error", cancelled: "cancelled" }[status] || "cancelled";
    return h("span", { class: "badge " + cls, text: status });
  }

  /** done (green) and failed (red) shares of a job's items, over a grey track. */
  function progressBar(job, big) {
    const total = Math.max(job.total, 1);
    const bar = h("div", { class: "progress" + (big ? " big" : ""), role: "progressbar",
      "aria-valuemin": 0, "aria-valuemax": job.total, "aria-valuenow": job.done + job.failed },
      h("span", { class: "p-done", style: `width:${(job.done / total) * 100}%` }),
      h("span", { class: "p-failed", style: `width:${(job.failed / total) * 100}%` }));
    withTip(bar, [job.name, ["done", fmtInt(job.done)], ["failed", fmtInt(job.failed)], ["left", fmtInt(job.remaining)], ["total", fmtInt(job.total)]]);
    return bar;
  }

  function fmtShare(job) {
    return fmtPercent(job.total ? (job.done + job.failed) / job.total : 0);
  }

  function stopJobRefresh() {
    clearTimeout(jobTimer);
    jobTimer = null;
  }

  /** Reload the page in a moment while something on it still runs. */
  function refreshWhile(running, reload) {
    stopJobRefresh();
    if (running) jobTimer = setTimeout(reload, JOB_REFRESH_MS);
  }

  function jobRow(job) {
    const open = () => { location.hash = "#/jobs/" + encodeURIComponent(job.name); };
    const row = h("tr", { class: "job-row", "data-job": job.name, tabindex: 0 },
      h("td", null, h("a", { class: "job-link", href: "#/jobs/" + encodeURIComponent(job.name), text: job.name })),
      h("td", null, h("span", { class: "tag", text: job.kind })),
      h("td", null, jobBadge(job.status)),
      h("td", { class: "progress-col" }, h("div", { class: "progress-cell" }, progressBar(job), h("span", { class: "share", text: fmtShare(job) }))),
      h("td", { class: "num", text: fmtInt(job.done) + " / " + fmtInt(job.total) }),
      h("td", { class: "num" + (job.failed ? " bad" : ""), text: fmtInt(job.failed) }),
      h("td", { class: "num", text: fmtCost(job.cost_usd) }),
      h("td", { class: "muted", text: fmtDateTime(job.updated_at) }));
    row.addEventListener("click", (e) => { if (!e.target.closest("a")) open(); });
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    return row;
  }

  // The kind filter's options: every kind in the store (an app that submits a job per interval, such as
  // evals.online, would otherwise bury the others); the chosen one is kept across reloads.
  function fillKinds(kinds) {
    const select = $("#job-kind");
    const chosen = select.value;
    const known = [...select.options].slice(1).map((o) => o.value);
    if (known.join("\n") === kinds.join("\n")) return;
    const options = kinds.map((k) => h("option", { value: k, text: k }));
    select.replaceChildren(h("option", { value: "", text: "Any kind" }), ...options);
    select.value = kinds.includes(chosen) ? chosen : "";
  }

  const JOBS_LIMIT = 200;

  async function loadJobs() {
    const mine = ++jobRequest;
    clearError();
    try {
      const body = await api("jobs", { status: $("#job-status").value, kind: $("#job-kind").value, limit: JOBS_LIMIT });
      if (mine !== jobRequest) return;
      fillKinds(body.kinds || []);
      const jobs = body.jobs;
      const tbody = $("#jobs tbody");
      if (!jobs.length) {
        const filtered = [$("#job-status").value, $("#job-kind").value].filter(Boolean).join(" ");
        const none = filtered ? "No " + filtered + " jobs." : "No jobs yet: keel rag ingest PATH -c NAME --job JOB starts one.";
        tbody.replaceChildren(h("tr", { class: "empty-row" }, h("td", { colspan: 8, text: none })));
      } else {
        tbody.replaceChildren(...jobs.map(jobRow));
      }
      const running = jobs.filter((j) => j.status === "running").length;
      // at the page's limit there are more: say these are the latest, not all of them
      const count = `${jobs.length >= JOBS_LIMIT ? "latest " : ""}${fmtInt(jobs.length)} job${jobs.length === 1 ? "" : "s"}`;
      $("#job-count").textContent = count + (running ? ` · ${running} running` : "");
      markUpdated();
      refreshWhile(running > 0, loadJobs);
    } catch (error) {
      showError(error);
    }
  }

  function traceLink(traceId, returnTo) {
    if (!traceId) return h("span", { class: "muted", text: "–" });
    const link = h("a", { class: "trace-link", href: "#/trace/" + encodeURIComponent(traceId), text: shortId(traceId), title: "Open the trace of this item's last run" });
    link.addEventListener("click", () => { state.returnTo = returnTo; });
    return link;
  }

  function itemBadge(status) {
    const cls = { pending: "pending", running: "running", done: "ok", failed: "error" }[status] || "pending";
    return h("span", { class: "badge " + cls, text: status });
  }

  function renderJob(body) {
    const job = body.job;
    const here = "#/jobs/" + encodeURIComponent(job.name);
    replace($("#job-name"), job.name, " ", jobBadge(job.status));
    $("#job-meta").textContent = `kind ${job.kind} · queue ${job.queue}`;
    const stat = (label, value) => h("div", null, h("dt", { text: label }), h("dd", { text: value }));
    replace($("#job-stats"),
      stat("Items", fmtInt(job.total)), stat("Cost so far", fmtCost(job.cost_usd)),
      stat("Created", fmtDateTime(job.created_at)), stat("Updated", fmtDateTime(job.updated_at)));
    replace($("#job-progress"), progressBar(job, true));
    $("#job-progress-text").textContent = `${fmtInt(job.done + job.failed)} of ${fmtInt(job.total)} finished · ${fmtShare(job)}`;
    const c = body.counts;
    const count = (label, n, cls) => h("div", { class: "job-count " + cls + (n ? "" : " zero") }, h("span", { class: "n", text: fmtInt(n) }), h("span", { class: "label", text: label }));
    replace($("#job-counts"), count("pending", c.pending, "pending"), count("running", c.running, "running"),
      count("done", c.done, "ok"), count("failed", c.failed, "error"));

    const failed = body.failed_items;
    $("#job-failed-card").hidden = !failed.length;
    $("#job-failed-hint").textContent = failed.length
      ? (failed.length < c.failed ? `first ${fmtInt(failed.length)} of ${fmtInt(c.failed)} · ` : "") + "rerun them with: keel jobs retry " + job.name
      : "";
    $("#job-failed tbody").replaceChildren(...failed.map((item) => h("tr", { class: "failed-row" },
      h("td", { class: "item-key", title: item.key, text: clip(item.key, 60) }),
      h("td", { class: "num", text: fmtInt(item.attempts) }),
      h("td", { class: "error-cell", text: item.error || "–" }),
      h("td", { class: "muted", text: fmtDateTime(item.updated_at) }),
      h("td", null, traceLink(item.trace_id, here)))));

    const items = body.items;
    $("#job-items-hint").textContent = items.length < job.total ? `first ${fmtInt(items.length)} of ${fmtInt(job.total)}` : `${fmtInt(items.length)} items`;
    $("#job-items tbody").replaceChildren(...items.map((item) => h("tr", { class: "item-row" },
      h("td", { class: "num muted", text: fmtInt(item.position + 1) }),
      h("td", { class: "item-key", title: item.key, text: clip(item.key, 70) }),
      h("td", null, itemBadge(item.status)),
      h("td", { class: "num", text: item.attempts ? fmtInt(item.attempts) : "–" }),
      h("td", { class: "num", text: fmtCost(item.cost_usd) }),
      h("td", { class: "muted", text: fmtDateTime(item.updated_at) }),
      h("td", null, traceLink(item.trace_id, here)))));
  }

  async function openJob(name) {
    const mine = ++jobRequest;
    clearError();
    try {
      const body = await api("jobs/" + encodeURIComponent(name), { limit: 100 });
      if (mine !== jobRequest) return;
      renderJob(body);
      markUpdated();
      refreshWhile(body.job.status === "running", () => openJob(name));
    } catch (error) {
      showError(error);
    }
  }

  function markUpdated() {
    $("#updated").textContent = "Updated " + new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  // --- routing ----------------------------------------------------------------------------

  // Pages in files of their own (static/evals.js) load first and push {view, nav, match(hash), open(hash, kit)}
  // onto window.keelPages; the kit is this file's helpers, so a page needs nothing else.
  const PAGES = window.keelPages || [];
  const KIT = { $, h, s, replace, api, showError, clearError, markUpdated, withTip, svgRoot, niceScale, clip, shortId,
    fmtInt, fmtCost, fmtMs, fmtPercent, fmtDateTime, fmtBucket, tooltip, empty, plotArea, xLabels, state };
  const VIEWS = ["overview-view", "trace-view", "jobs-view", "job-view", ...PAGES.map((p) => p.view)];

  /** Show one view; the filter bar and the range buttons belong to the overview only. */
  function showView(id) {
    for (const view of VIEWS) $("#" + view).hidden = view !== id;
    $("#filters").hidden = id !== "overview-view";
    $("#ranges").hidden = id !== "overview-view";
    const page = PAGES.find((p) => p.view === id);
    const section = page ? page.nav : id.startsWith("job") ? "jobs" : "overview";
    for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.view === section);
  }

  function route() {
    const trace = location.hash.match(/^#\/trace\/(.+)$/);
    const job = location.hash.match(/^#\/jobs\/(.+)$/);
    const page = PAGES.find((p) => p.match(location.hash));
    tooltip().hidden = true;
    stopJobRefresh();
    jobRequest++; // an answer still on its way belongs to the page we left
    if (trace) {
      showView("trace-view");
      $("#trace-back").textContent = state.returnTo ? state.returnLabel || "← Job" : "← Traces";
      window.scrollTo(0, 0);
      openTrace(decodeURIComponent(trace[1]));
    } else if (job) {
      showView("job-view");
      window.scrollTo(0, 0);
      openJob(decodeURIComponent(job[1]));
    } else if (page) {
      showView(page.view);
      window.scrollTo(0, 0);
      page.open(location.hash, KIT);
    } else if (location.hash === "#/jobs") {
      showView("jobs-view");
      loadJobs();
    } else {
      state.trace = null;
      state.selected = null;
      showView("overview-view");
      reloadAll();
    }
    if (!trace) state.returnTo = state.returnLabel = null;
  }

  function start() {
    readUrl();
    markRange();
    bindFilters();
    $("#signout").hidden = !localStorage.getItem(KEY_STORAGE);
    $("#trace-back").addEventListener("click", () => { location.hash = state.returnTo || "#/"; });
    $("#job-back").addEventListener("click", () => { location.hash = "#/jobs"; });
    $("#job-status").addEventListener("change", loadJobs);
    $("#job-kind").addEventListener("change", loadJobs);
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
