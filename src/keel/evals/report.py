"""`keel eval report`: one self-contained HTML file about one or more runs.

Self-contained because a report is attached to a CI job or mailed around and opened where there is
no network and no keel: the plots are matplotlib PNGs embedded as base64, the styles are inline,
there is no script. It shows
- a summary per run (cases, pass rate, metric means, errored scores, cost, latency),
- score distributions per metric per run,
- quality against cost and latency per run (variant),
- a per-tag breakdown (the most frequent tags),
- with two runs or more: each run compared with the first (keel.evals.compare), as a forest plot of
  the paired deltas with their intervals, and the cases that flipped, side by side.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keel.errors import InputError
from keel.evals.compare import Comparison, compare
from keel.evals.results import CaseResult, RunResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["build_report", "write_report"]

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]
MAX_TAGS = 15
MAX_FLIPS = 25  # per direction: the table is evidence to read, the full list is in --json
MAX_TEXT = 300  # characters of an input or output shown in the flipped-cases table


# --- per-run numbers ----------------------------------------------------------------------------


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class _Summary:
    label: str
    run: RunResult
    cases: int  # distinct case ids
    repeats: int
    pass_rate: float | None
    means: dict[str, float | None]
    errored: dict[str, int]  # metric -> errored scores
    task_errors: int
    cost_total: float | None
    cost_per_case: float | None
    latency_p50: float | None
    latency_p95: float | None


def _mean(values: Sequence[float | None]) -> float | None:
    usable = [v for v in values if v is not None]
    return float(np.mean(usable)) if usable else None


def _summary(label: str, run: RunResult) -> _Summary:
    metrics = run.metric_names()
    scores = {m: [_finite(c.scores.get(m)) for c in run.cases] for m in metrics}
    costs = [v for v in (_finite(c.cost_usd) for c in run.cases) if v is not None]
    latencies = [v for v in (_finite(c.latency_s) for c in run.cases) if v is not None]
    ids = {c.case_id for c in run.cases}
    return _Summary(
        label=label, run=run, cases=len(ids), repeats=max((c.repeat for c in run.cases), default=0) + 1,
        pass_rate=_mean([None if c.passed is None else float(c.passed) for c in run.cases]),
        means={m: _mean(v) for m, v in scores.items()},
        errored={m: sum(1 for v in values if v is None) for m, values in scores.items()},
        task_errors=sum(1 for c in run.cases if c.error), cost_total=sum(costs) if costs else None,
        cost_per_case=float(np.mean(costs)) if costs else None,
        latency_p50=float(np.percentile(latencies, 50)) if latencies else None,
        latency_p95=float(np.percentile(latencies, 95)) if latencies else None,
    )  # fmt: skip


def _quality(case: CaseResult, metric: str | None) -> float | None:
    """The case's quality: its pass/fail when the run has one, else the main metric."""
    if metric is None:
        return None if case.passed is None else float(case.passed)
    return _finite(case.scores.get(metric))


def _quality_metric(runs: Sequence[RunResult]) -> str | None:
    """None (pass rate) when any case carries pass/fail, else the first metric."""
    if any(c.passed is not None for r in runs for c in r.cases):
        return None
    names = [m for r in runs for m in r.metric_names()]
    return names[0] if names else None


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


def _distributions(summaries: Sequence[_Summary]) -> str | None:
    """Per metric, a histogram of case scores over [0, 1], the runs' bars side by side."""
    metrics = list(dict.fromkeys(m for s in summaries for m in s.means))
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig = _figure(4.2 * cols, 2.9 * rows + 0.4)
    edges = np.linspace(0, 1, 11)
    width = 0.1 / (len(summaries) + 0.5)
    for k, metric in enumerate(metrics):
        ax: Axes = fig.add_subplot(rows, cols, k + 1)
        for i, s in enumerate(summaries):
            values = [v for v in (_finite(c.scores.get(metric)) for c in s.run.cases) if v is not None]
            counts, _ = np.histogram(np.clip(values, 0, 1), bins=edges)
            share = counts / max(len(values), 1)
            ax.bar(edges[:-1] + width * (i + 0.25), share, width=width, align="edge", color=COLORS[i % len(COLORS)],
                   label=_short(s.label))  # fmt: skip
            mean = s.means.get(metric)
            if mean is not None:
                ax.axvline(mean, color=COLORS[i % len(COLORS)], linestyle="--", linewidth=1)
        ax.set_title(metric, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("score (dashed: mean)", fontsize=8)
        ax.set_ylabel("share of cases", fontsize=8)
        ax.tick_params(labelsize=8)
    _legend(fig, len(summaries))
    return _png(fig)


def _quality_vs_spend(summaries: Sequence[_Summary], metric: str | None) -> str | None:
    """Quality (pass rate or the main metric) against mean cost and mean latency per case."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    points = []
    for i, s in enumerate(summaries):
        quality = s.pass_rate if metric is None else s.means.get(metric)
        if quality is not None:
            points.append((i, s, quality))
    spends = [("cost per case (USD)", "cost_per_case"), ("latency p50 (s)", "latency_p50")]
    spends = [(label, attr) for label, attr in spends if any(getattr(s, attr) is not None for _, s, _ in points)]
    if not points or not spends:
        return None
    fig = _figure(4.6 * len(spends), 3.4)
    for k, (label, attr) in enumerate(spends):
        ax: Axes = fig.add_subplot(1, len(spends), k + 1)
        for i, s, quality in points:
            x = getattr(s, attr)
            if x is None:
                continue
            ax.scatter([x], [quality], s=60, color=COLORS[i % len(COLORS)], label=_short(s.label), zorder=3)
        xs = [getattr(s, attr) for _, s, _ in points if getattr(s, attr) is not None]
        middle = (min(xs) + max(xs)) / 2
        for _, s, quality in points:
            x = getattr(s, attr)
            if x is not None:  # the variant's name on the side of the point that has room
                right = x > middle
                ax.annotate(_short(s.run.variant or s.label, 40), (x, quality), textcoords="offset points",
                            xytext=(-7 if right else 7, 5), ha="right" if right else "left", fontsize=7)  # fmt: skip
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("pass rate" if metric is None else f"mean {metric}", fontsize=8)
        ax.set_ylim(-0.02, 1.05)
        ax.margins(x=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    _legend(fig, len(points))
    return _png(fig)


def _tag_rows(summaries: Sequence[_Summary], metric: str | None) -> list[tuple[str, list[tuple[float | None, int]]]]:
    """The most frequent tags, each with (quality, cases) per run."""
    counts: Counter[str] = Counter(t for s in summaries for c in s.run.cases for t in c.tags)
    rows = []
    for tag, _ in counts.most_common(MAX_TAGS):
        per_run = []
        for s in summaries:
            values = [_quality(c, metric) for c in s.run.cases if tag in c.tags]
            per_run.append((_mean(values), len(values)))
        rows.append((tag, per_run))
    return rows


def _tags_plot(summaries: Sequence[_Summary], rows: Sequence[tuple[str, list[tuple[float | None, int]]]],
               metric: str | None) -> str | None:  # fmt: skip
    if not rows:
        return None
    fig = _figure(8.5, 0.5 + 0.32 * len(rows) * max(1, len(summaries)) ** 0.6 + 0.8)
    ax: Axes = fig.add_subplot(1, 1, 1)
    height = 0.8 / len(summaries)
    y = np.arange(len(rows))
    for i, s in enumerate(summaries):
        values = [per_run[i][0] or 0.0 for _, per_run in rows]
        ax.barh(y + i * height, values, height=height, color=COLORS[i % len(COLORS)], label=_short(s.label))
    ax.set_yticks(y + height * (len(summaries) - 1) / 2, [_short(tag, 32) for tag, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("pass rate" if metric is None else f"mean {metric}", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    _legend(fig, len(summaries))
    return _png(fig)


def _forest(comparisons: Sequence[tuple[_Summary, Comparison]]) -> str | None:
    """Each run's paired deltas against the baseline, with their intervals; red when significantly worse."""
    rows = [(s, m) for s, c in comparisons for m in c.metrics if m.delta is not None]
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
    return f'<span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>'


def _runs_table(summaries: Sequence[_Summary]) -> str:
    metrics = list(dict.fromkeys(m for s in summaries for m in s.means))
    head = "".join(f"<th>{_e(m)}</th>" for m in metrics)
    out = [f"<table><tr><th>run</th><th>variant</th><th>cases</th><th>pass rate</th>{head}<th>errored scores</th>"
           "<th>task errors</th><th>cost (USD)</th><th>latency p50 / p95 (s)</th></tr>"]  # fmt: skip
    for i, s in enumerate(summaries):
        cells = "".join(f'<td class="n">{_f(s.means.get(m))}</td>' for m in metrics)
        repeats = f" x {s.repeats}" if s.repeats > 1 else ""
        out.append(
            f"<tr><td>{_swatch(i)}{_e(s.label)}</td><td>{_e(s.run.variant)}</td><td class='n'>{s.cases}{repeats}</td>"
            f"<td class='n'>{_f(s.pass_rate)}</td>{cells}<td class='n'>{sum(s.errored.values())}</td>"
            f"<td class='n'>{s.task_errors}</td><td class='n'>{_f(s.cost_total, 6)}</td>"
            f"<td class='n'>{_f(s.latency_p50, 2)} / {_f(s.latency_p95, 2)}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def _tags_table(summaries: Sequence[_Summary], rows: Sequence[tuple[str, list[tuple[float | None, int]]]]) -> str:
    head = "".join(f"<th>{_swatch(i)}{_e(s.label)}</th>" for i, s in enumerate(summaries))
    out = [f"<table><tr><th>tag</th>{head}</tr>"]
    for tag, per_run in rows:
        cells = "".join(f"<td class='n'>{_f(q)} <span class='dim'>({n})</span></td>" for q, n in per_run)
        out.append(f"<tr><td>{_e(tag)}</td>{cells}</tr>")
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


def _score(case: CaseResult | None, metric: str) -> str:
    return _f(_finite(case.scores.get(metric)) if case else None)


def _flip_row(case_id: str, flip: str, css: str, ca: CaseResult | None, cb: CaseResult | None) -> str:
    metrics = dict.fromkeys([*(ca.scores if ca else {}), *(cb.scores if cb else {})])
    scores = "<br>".join(f"{_e(m)}: {_score(ca, m)} → {_score(cb, m)}" for m in metrics)
    texts = [*((ca.input, ca.expected, ca.output) if ca else (None, None, None)), cb.output if cb else None]
    cells = "".join(f"<td class='text'>{_text(t)}</td>" for t in texts)
    return f"<tr><td>{_e(case_id)}</td><td class='{css}'>{flip}</td>{cells}<td>{scores}</td></tr>"


def _flips_table(c: Comparison, a: RunResult, b: RunResult) -> str:
    by_a = {x.case_id: x for x in a.cases if x.repeat == 0}
    by_b = {x.case_id: x for x in b.cases if x.repeat == 0}
    if not c.pass_to_fail and not c.fail_to_pass:
        return "<p class='dim'>No case flipped between pass and fail.</p>"
    flips = [(i, "pass→fail", "worse") for i in c.pass_to_fail[:MAX_FLIPS]]
    flips += [(i, "fail→pass", "better") for i in c.fail_to_pass[:MAX_FLIPS]]
    out = ["<table><tr><th>case</th><th>flip</th><th>input</th><th>expected</th><th>output A</th><th>output B</th>"
           "<th>scores A → B</th></tr>"]  # fmt: skip
    for case_id, flip, css in flips:
        out.append(_flip_row(case_id, flip, css, by_a.get(case_id), by_b.get(case_id)))
    out.append("</table>")
    hidden = len(c.pass_to_fail) + len(c.fail_to_pass) - len(flips)
    if hidden:
        out.append(f"<p class='dim'>... and {hidden} more (at most {MAX_FLIPS} shown each way; all of them in "
                   "<code>keel eval compare --json</code>).</p>")  # fmt: skip
    return "".join(out)


def _labels(runs: Sequence[RunResult]) -> list[str]:
    """Run ids, made unique when the same id is given twice."""
    counts = Counter(r.run_id for r in runs)
    return [r.run_id if counts[r.run_id] == 1 else f"{r.run_id} #{i + 1}" for i, r in enumerate(runs)]


def _section(title: str, body: str | None, empty: str) -> str:
    return f"<h2>{_e(title)}</h2>" + (body if body else f"<p class='dim'>{_e(empty)}</p>")


def _comparisons(
    summaries: Sequence[_Summary], cluster_by: str | None
) -> tuple[list[tuple[_Summary, Comparison]], list[str]]:
    out: list[tuple[_Summary, Comparison]] = []
    problems: list[str] = []
    base = summaries[0]
    for s in summaries[1:]:
        try:
            out.append((s, compare(base.run, s.run, cluster_by=cluster_by)))
        except InputError as error:  # e.g. no shared case: the report still shows the runs
            problems.append(f"{s.label} against {base.label}: {error.message}")
    return out, problems


def _compared(summaries: Sequence[_Summary], comparisons: Sequence[tuple[_Summary, Comparison]],
              problems: Sequence[str]) -> str:  # fmt: skip
    """The forest plot and, per run, its table of paired deltas, notes and verdict."""
    body = [f"<p class='note'>{_e(p)}</p>" for p in problems]
    forest = _forest(comparisons)
    if forest:
        body.append(forest)
    for s, c in comparisons:
        body.append(f"<h3>{_e(s.label)} ({_e(c.variant_b)}) against {_e(summaries[0].label)} ({_e(c.variant_a)})"
                    f" · {c.shared} shared cases</h3>")  # fmt: skip
        body.append(_comparison_table(c))
        body.extend(f"<p class='note'>note: {_e(n)}</p>" for n in c.notes)
        regressions = ", ".join(m.metric for m in c.regressions())
        body.append(f"<p class='worse'>Significant drop: {_e(regressions)}</p>" if regressions
                    else "<p class='better'>No significant drop.</p>")  # fmt: skip
    return "".join(body)


def _flipped(summaries: Sequence[_Summary], comparisons: Sequence[tuple[_Summary, Comparison]]) -> str:
    body = []
    for s, c in comparisons:
        body.append(f"<h3>{_e(s.label)} against {_e(summaries[0].label)}: {len(c.pass_to_fail)} pass→fail, "
                    f"{len(c.fail_to_pass)} fail→pass</h3>")  # fmt: skip
        body.append(_flips_table(c, summaries[0].run, s.run))
    return "".join(body)


def build_report(runs: Sequence[RunResult], *, cluster_by: str | None = None, title: str | None = None) -> str:
    """The report as one HTML document. The first run is the baseline of the comparisons."""
    if not runs:
        raise InputError("a report needs at least one run")
    summaries = [_summary(label, run) for label, run in zip(_labels(runs), runs, strict=True)]
    metric = _quality_metric(runs)
    tag_rows = _tag_rows(summaries, metric)
    suites = ", ".join(dict.fromkeys(r.suite for r in runs))
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title or 'keel eval report')}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title or 'keel eval report')}</h1>",
        f"<p class='sub'>suite {_e(suites)} · {len(runs)} run(s) · written {written}</p>",
        "<h2>Runs</h2>", _runs_table(summaries),
    ]  # fmt: skip
    comparisons: list[tuple[_Summary, Comparison]] = []
    if len(summaries) > 1:
        comparisons, problems = _comparisons(summaries, cluster_by)
        parts.append("<h2>Compared with the baseline (first run)</h2>" + _compared(summaries, comparisons, problems))
    parts.append(_section("Score distributions", _distributions(summaries), "No run has per-metric scores."))
    parts.append(_section("Quality against cost and latency", _quality_vs_spend(summaries, metric),
                          "No run records cost or latency."))  # fmt: skip
    tags_plot = _tags_plot(summaries, tag_rows, metric)
    parts.append(_section("By tag", (tags_plot + _tags_table(summaries, tag_rows)) if tags_plot else None,
                          "No case has tags."))  # fmt: skip
    if comparisons:
        parts.append("<h2>Flipped cases</h2>" + _flipped(summaries, comparisons))
    parts.append("</body></html>")
    return "\n".join(parts)


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
