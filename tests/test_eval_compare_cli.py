"""`keel eval compare` and `keel eval report` on run JSON files: tables, JSON, exit codes.

The commands are registered on a bare typer group here, as the `keel eval` group does with
`eval_compare.register(app)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from keel.cli.eval_compare import register
from keel.evals import RunResult
from keel.evals.results import run_to_json
from test_eval_compare import make_run

app = typer.Typer()
register(app)
runner = CliRunner()


def save(run: RunResult, path: Path) -> str:
    path.write_text(run_to_json(run), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A baseline, a run that is significantly worse, and one that differs only by noise."""
    rng = np.random.default_rng(5)
    base = rng.beta(3, 2, size=200)
    worse = np.clip(base - 0.08 + rng.normal(0, 0.05, size=200), 0, 1)
    shift = np.where(np.arange(200) % 2 == 0, 0.03, -0.03)  # true mean difference 0
    same = np.clip(base + shift, 0, 1)
    tags = [[f"topic:{i % 12}"] for i in range(200)]
    cost = [0.001] * 200
    return {
        "a": save(make_run("base", base.tolist(), tags=tags, cost=cost), tmp_path / "a.json"),
        "worse": save(make_run("worse", worse.tolist(), tags=tags, cost=cost), tmp_path / "worse.json"),
        "same": save(make_run("same", same.tolist(), tags=tags, cost=cost), tmp_path / "same.json"),
        "other": save(make_run("other", [0.5, 0.6, 0.7], ids=["x", "y", "z"]), tmp_path / "other.json"),
    }


def test_a_significant_drop_prints_tables_and_exits_1_only_when_asked(files: dict[str, str]) -> None:
    result = runner.invoke(app, ["compare", files["a"], files["worse"]])
    assert result.exit_code == 0, result.output
    for text in ("200 shared cases", "f1", "worse", "pass rate", "McNemar:", "pass->fail",
                 "cost USD", "regression: f1"):  # fmt: skip
        assert text in result.output
    gated = runner.invoke(app, ["compare", files["a"], files["worse"], "--fail-on-regression"])
    assert gated.exit_code == 1
    assert "dropped significantly" in gated.output


def test_no_significant_difference_exits_0_with_the_gate(files: dict[str, str]) -> None:
    result = runner.invoke(app, ["compare", files["a"], files["same"], "--fail-on-regression"])
    assert result.exit_code == 0, result.output
    assert "no significant drop" in result.output


def test_json_output_and_cluster_option(files: dict[str, str]) -> None:
    result = runner.invoke(
        app, ["compare", files["a"], files["worse"], "--json", "--cluster", "topic", "--alpha", "0.01"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["alpha"] == 0.01 and data["cluster_by"] == "topic" and data["n_clusters"] == 12
    assert "f1" in data["regressions"]
    f1 = data["metrics"][0]
    assert f1["metric"] == "f1" and f1["level"] == pytest.approx(0.99) and f1["ci"][1] < 0
    assert data["cost"]["delta"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "missing.json", "{a}"], "no such run file"),
        (["compare", "{a}", "{other}"], "share no case"),
        (["compare", "{a}", "{worse}", "--alpha", "2"], "alpha must be between 0 and 1"),
        (["compare", "{a}", "{worse}", "--cluster", "source"], "no shared case has a tag source:"),
        (["compare", "{a}", "{broken}"], "broken.json: (top level): Invalid JSON"),
        (["compare", "{a}", "run-0123"], "no evaluation run 'run-0123'"),
        (["report", "{a}", "--out", "{dir}/no/such/dir/r.html"], "cannot write the report"),
    ],
)
def test_bad_input_exits_2_with_a_message(files: dict[str, str], tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    names = {**files, "broken": str(tmp_path / "broken.json"), "dir": str(tmp_path)}
    result = runner.invoke(app, [arg.format(**names) for arg in args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_report_writes_one_html_file(files: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", files["a"], files["worse"], files["same"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 run(s)" in result.output
    page = out.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4 and "worse against base" in page
