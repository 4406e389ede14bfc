"""`keel eval report`: one self-contained HTML file about one or more runs.

Self-contained because a report is attached to a CI job or mailed around and opened where there is
no network and no keel: the plots are matplotlib PNGs embedded as base64, the styles are inline,
there is no script. It shows
- a summary per run (cases, pass rate, metric means, errored scores, cost, latency),
- score distributions per metric per run,
- quality against cost and latency per run (variant),
- a per-tag breakdown (the most frequent tags),
- with two runs or more: each run compared with the first (keel.evals.compare), as a forest plot of
  the paired deltas with their intervals, and the cases that flipped, side by side;
- with one run: its failing cases.
Every number comes from `keel.evals.report_data`, which the dashboard's Evals page reads too: this
module only draws and formats.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keel.errors import InputError
from keel.evals.compare import Comparison
from keel.evals.report_data import (
    MAX_FLIPS,
    CaseView,
    ComparedRun,
    ReportData,
    RunStats,
    TagRow,
    build_report_data,
    finite,
)
from keel.evals.results import RunResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["build_report", "render_report", "write_report"]

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]
MAX_TEXT = 300  # characters of an input or output shown in the cases tables


# --- plots -----------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="" src="data:image/png;base64,{data}">'


def _legend(fig: Figure, entries: int) -> None:
    """One legend for the figure, above the plots, where it hides no bar or point."""
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(entries, 4), fontsize=8, frameon=False)


def _short(label: str, limit: int = 28) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _distributions(data: ReportData) -> str | None:
    """Per metric, a histogram of case scores over [0, 1], the runs' bars side by side."""
    if not data.distributions:
        return None
    cols = min(3, len(data.distributions))
    rows = -(-len(data.distributions) // cols)
    fig = _figure(4.2 * cols, 2.9 * rows + 0.4)
    width = 0.1 / (len(data.runs) + 0.5)
    for k, d in enumerate(data.distributions):
        ax: Axes = fig.add_subplot(rows, cols, k + 1)
        edges = np.array(d.edges)
        for i, s in enumerate(data.runs):
            share = np.array(d.counts[i]) / max(d.n[i], 1)
            ax.bar(edges[:-1] + width * (i + 0.25), share, width=width, align="edge", color=_color(i),
                   label=_short(s.label))  # fmt: skip
            mean = d.means[i]
            if mean is not None:
                ax.axvline(mean, color=_color(i), linestyle="--", linewidth=1)
        ax.set_title(d.metric, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("score (dashed: mean)", fontsize=8)
        ax.set_ylabel("share of cases", fontsize=8)
        ax.tick_params(labelsize=8)
    _legend(fig, len(data.runs))
    return _png(fig)


def _quality_vs_spend(data: ReportData) -> str | None:
    """Quality (pass rate or the main metric) against mean cost and mean latency per case."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    spends = [("cost per case (USD)", "cost_per_case"), ("latency p50 (s)", "latency_p50")]
    spends = [(label, attr) for label, attr in spends if any(getattr(p, attr) is not None for p in data.spend)]
    if not spends:
        return None
    fig = _figure(4.6 * len(spends), 3.4)
    for k, (label, attr) in enumerate(spends):
        ax: Axes = fig.add_subplot(1, len(spends), k + 1)
        points = [(p, getattr(p, attr)) for p in data.spend if getattr(p, attr) is not None]
        for p, x in points:
            ax.scatter([x], [p.quality], s=60, color=_color(p.run), label=_short(data.runs[p.run].label), zorder=3)
        middle = (min(x for _, x in points) + max(x for _, x in points)) / 2
        for p, x in points:  # the variant's name on the side of the point that has room
            right = x > middle
            s = data.runs[p.run]
            ax.annotate(_short(s.variant or s.label, 40), (x, p.quality), textcoords="offset points",
                        xytext=(-7 if right else 7, 5), ha="right" if right else "left", fontsize=7)  # fmt: skip
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel(data.quality_label, fontsize=8)
        ax.set_ylim(-0.02, 1.05)
        ax.margins(x=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    _legend(fig, len(data.spend))
    return _png(fig)


def _tags_plot(data: ReportData) -> str | None:
    if not data.tags:
        return None
    runs = len(data.runs)
    fig = _figure(8.5, 0.5 + 0.32 * len(data.tags) * max(1, runs) ** 0.6 + 0.8)
    ax: Axes = fig.add_subplot(1, 1, 1)
    height = 0.8 / runs
    y = np.arange(len(data.tags))
    for i, s in enumerate(data.runs):
        values = [row.quality[i] or 0.0 for row in data.tags]
        ax.barh(y + i * height, values, height=height, color=_color(i), label=_short(s.label))
    ax.set_yticks(y + height * (runs - 1) / 2, [_short(row.tag, 32) for row in data.tags], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(data.quality_label, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    _legend(fig, runs)
    return _png(fig)


def _forest(data: ReportData) -> str | None:
    """Each run's paired deltas against the baseline, with their intervals; red when significantly worse."""
    rows = [(data.runs[c.run], m) for c in data.compared for m in c.comparison.metrics if m.delta is not None]
    if not rows:
        return None
    fig = _figure(7.5, 0.8 + 0.38 * len(rows))
    ax: Axes = fig.add_subplot(1, 1, 1)
    for k, (_, m) in enumerate(rows):
        color = {"drop": "#d62728", "rise": "#2ca02c"}.get(m.change(), "#555555")
        if m.ci is not None:
            ax.plot([m.ci[0], m.ci[1]], [k, k], color=color, linewidth=2)
        ax.plot([m.delta or 0.0], [k], "o", color=color)  # never None: filtered above
    labels = [f"{_short(s.label, 20)}: {'pass rate' if m.kind == 'pass' else m.metric}" for s, m in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("paired delta against the baseline, with its interval (red: significant drop)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


# --- HTML ----------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 30px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
th { background: #f4f5f7; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.worse { color: #c62828; font-weight: 600; } .better { color: #2e7d32; font-weight: 600; }
.note { color: #8a6d00; } .dim { color: #888; }
img { max-width: 100%; } .swatch { display: inline-block; width: 10px; height: 10px; margin-right: 5px; }
td.text { max-width: 280px; white-space: pre-wrap; word-break: break-word; font-size: 12px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _f(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return '<span class="dim">-</span>'
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _text(value: object) -> str:
    text = "" if value is None else str(value)
    return _e(text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…")


def _swatch(i: int) -> str:
    return f'<span class="swatch" style="background:{_color(i)}"></span>'


def _runs_table(runs: Sequence[RunStats]) -> str:
    metrics = list(dict.fromkeys(m for s in runs for m in s.means))
    head = "".join(f"<th>{_e(m)}</th>" for m in metrics)
    out = [f"<table><tr><th>run</th><th>variant</th><th>cases</th><th>pass rate</th>{head}<th>errored scores</th>"
           "<th>task errors</th><th>cost (USD)</th><th>latency p50 / p95 (s)</th></tr>"]  # fmt: skip
    for i, s in enumerate(runs):
        cells = "".join(f'<td class="n">{_f(s.means.get(m))}</td>' for m in metrics)
        repeats = f" x {s.repeats}" if s.repeats > 1 else ""
        out.append(
            f"<tr><td>{_swatch(i)}{_e(s.label)}</td><td>{_e(s.variant)}</td><td class='n'>{s.cases}{repeats}</td>"
            f"<td class='n'>{_f(s.pass_rate)}</td>{cells}<td class='n'>{sum(s.errored.values())}</td>"
            f"<td class='n'>{s.task_errors}</td><td class='n'>{_f(s.cost_total, 6)}</td>"
            f"<td class='n'>{_f(s.latency_p50, 2)} / {_f(s.latency_p95, 2)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _tags_table(runs: Sequence[RunStats], rows: Sequence[TagRow]) -> str:
    head = "".join(f"<th>{_swatch(i)}{_e(s.label)}</th>" for i, s in enumerate(runs))
    out = [f"<table><tr><th>tag</th>{head}</tr>"]
    for row in rows:
        per_run = zip(row.quality, row.n, strict=True)
        cells = "".join(f"<td class='n'>{_f(q)} <span class='dim'>({n})</span></td>" for q, n in per_run)
        out.append(f"<tr><td>{_e(row.tag)}</td>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _comparison_table(c: Comparison) -> str:
    level = f"{100 * (1 - c.alpha):g}%"
    out = [f"<table><tr><th>metric</th><th>n</th><th>left out</th><th>A mean</th><th>B mean</th><th>delta B-A</th>"
           f"<th>{level} CI</th><th>p</th><th>verdict</th></tr>"]  # fmt: skip
    rows = [*c.metrics, *(d for d in (c.cost, c.latency) if d is not None)]
    for m in rows:
        digits = 6 if m.kind == "cost" else 3
        ci = "-" if m.ci is None else f"[{m.ci[0]:+.{digits}f}, {m.ci[1]:+.{digits}f}]"
        verdict = m.verdict()
        css = "worse" if verdict in ("worse", "higher") else "better" if verdict in ("better", "lower") else "dim"
        name = {"pass": "pass rate (McNemar)", "cost": "cost per case (USD)", "latency": "latency per case (s)"}
        p = "-" if m.p_value is None else ("&lt;0.0001" if m.p_value < 1e-4 else f"{m.p_value:.4f}")
        out.append(
            f"<tr><td>{_e(name.get(m.kind, m.metric))}</td><td class='n'>{m.n}</td><td class='n'>{m.excluded}</td>"
            f"<td class='n'>{_f(m.mean_a, digits)}</td><td class='n'>{_f(m.mean_b, digits)}</td>"
            f"<td class='n'>{_f(m.delta, digits, True)}</td><td class='n'>{ci}</td><td class='n'>{p}</td>"
            f"<td class='{css}'>{_e(verdict)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _score(scores: Mapping[str, float | None], metric: str) -> str:
    return _f(finite(scores.get(metric)))


def _flip_row(case: CaseView) -> str:
    flip, css = ("pass→fail", "worse") if case.direction == "pass_to_fail" else ("fail→pass", "better")
    metrics = dict.fromkeys([*case.scores, *case.scores_b])
    scores = "<br>".join(f"{_e(m)}: {_score(case.scores, m)} → {_score(case.scores_b, m)}" for m in metrics)
    texts = (case.input, case.expected, case.output, case.output_b)
    cells = "".join(f"<td class='text'>{_text(t)}</td>" for t in texts)
    return f"<tr><td>{_e(case.case_id)}</td><td class='{css}'>{flip}</td>{cells}<td>{scores}</td></tr>"


def _flips_table(compared: ComparedRun) -> str:
    if not compared.flips:
        return "<p class='dim'>No case flipped between pass and fail.</p>"
    out = ["<table><tr><th>case</th><th>flip</th><th>input</th><th>expected</th><th>output A</th><th>output B</th>"
           "<th>scores A → B</th></tr>"]  # fmt: skip
    out.extend(_flip_row(case) for case in compared.flips)
    out.append("</table>")
    if compared.hidden_flips:
        out.append(f"<p class='dim'>... and {compared.hidden_flips} more (at most {MAX_FLIPS} shown each way; all of "
                   "them in <code>keel eval compare --json</code>).</p>")  # fmt: skip
    return "".join(out)


def _failing_table(cases: Sequence[CaseView], total: int) -> str:
    if not cases:
        return "<p class='dim'>No case failed.</p>"
    out = ["<table><tr><th>case</th><th>input</th><th>expected</th><th>output</th><th>scores</th><th>trace</th></tr>"]
    for case in cases:
        scores = "<br>".join(f"{_e(m)}: {_score(case.scores, m)}" for m in case.scores)
        output = _text(case.output) if case.error is None else f"<span class='worse'>{_text(case.error)}</span>"
        repeat = f" (repeat {case.repeat})" if case.repeat else ""
        out.append(f"<tr><td>{_e(case.case_id)}{repeat}</td><td class='text'>{_text(case.input)}</td>"
                   f"<td class='text'>{_text(case.expected)}</td><td class='text'>{output}</td><td>{scores}</td>"
                   f"<td><code>{_e(case.trace_id or '-')}</code></td></tr>")  # fmt: skip
    out.append("</table>")
    if total > len(cases):
        out.append(f"<p class='dim'>... and {total - len(cases)} more (the first {len(cases)} shown).</p>")
    return "".join(out)


def _section(title: str, body: str | None, empty: str) -> str:
    return f"<h2>{_e(title)}</h2>" + (body if body else f"<p class='dim'>{_e(empty)}</p>")


def _compared(data: ReportData) -> str:
    """The forest plot and, per run, its table of paired deltas, notes and verdict."""
    body = [f"<p class='note'>{_e(p)}</p>" for p in data.problems]
    forest = _forest(data)
    if forest:
        body.append(forest)
    base = data.runs[0]
    for compared in data.compared:
        s, c = data.runs[compared.run], compared.comparison
        body.append(f"<h3>{_e(s.label)} ({_e(c.variant_b)}) against {_e(base.label)} ({_e(c.variant_a)})"
                    f" · {c.shared} shared cases</h3>")  # fmt: skip
        body.append(_comparison_table(c))
        body.extend(f"<p class='note'>note: {_e(n)}</p>" for n in c.notes)
        regressions = ", ".join(m.metric for m in c.regressions())
        body.append(f"<p class='worse'>Significant drop: {_e(regressions)}</p>" if regressions
                    else "<p class='better'>No significant drop.</p>")  # fmt: skip
    return "".join(body)


def _flipped(data: ReportData) -> str:
    body = []
    for compared in data.compared:
        c = compared.comparison
        body.append(f"<h3>{_e(data.runs[compared.run].label)} against {_e(data.runs[0].label)}: "
                    f"{len(c.pass_to_fail)} pass→fail, {len(c.fail_to_pass)} fail→pass</h3>")  # fmt: skip
        body.append(_flips_table(compared))
    return "".join(body)


def render_report(data: ReportData, *, title: str | None = None) -> str:
    """`data` as one HTML document."""
    suites = ", ".join(dict.fromkeys(r.suite for r in data.runs))
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title or 'keel eval report')}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title or 'keel eval report')}</h1>",
        f"<p class='sub'>suite {_e(suites)} · {len(data.runs)} run(s) · written {written}</p>",
        "<h2>Runs</h2>", _runs_table(data.runs),
    ]  # fmt: skip
    if len(data.runs) > 1:
        parts.append("<h2>Compared with the baseline (first run)</h2>" + _compared(data))
    parts.append(_section("Score distributions", _distributions(data), "No run has per-metric scores."))
    parts.append(_section("Quality against cost and latency", _quality_vs_spend(data),
                          "No run records cost or latency."))  # fmt: skip
    tags_plot = _tags_plot(data)
    parts.append(_section("By tag", (tags_plot + _tags_table(data.runs, data.tags)) if tags_plot else None,
                          "No case has tags."))  # fmt: skip
    if data.compared:
        parts.append("<h2>Flipped cases</h2>" + _flipped(data))
    if len(data.runs) == 1:
        parts.append("<h2>Failing cases</h2>" + _failing_table(data.failing[0], data.failing_total[0]))
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(runs: Sequence[RunResult], *, cluster_by: str | None = None, title: str | None = None) -> str:
    """The report as one HTML document. The first run is the baseline of the comparisons."""
    return render_report(build_report_data(runs, cluster_by=cluster_by), title=title)


def write_report(runs: Sequence[RunResult], path: str | Path, *, cluster_by: str | None = None,
                 title: str | None = None) -> Path:  # fmt: skip
    """Write `build_report` to `path`; InputError when it cannot be written."""
    target = Path(path)
    text = build_report(runs, cluster_by=cluster_by, title=title)
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as error:
        raise InputError(f"{target}: cannot write the report: {error.strerror}") from None
    return target
