"""The gateway end to end on both stores: spans, stats and budgets read back the same."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import write_config
from keel import Gateway, TestModel, errors
from keel.config import load_config
from keel.errors import ServerError
from keel.store import SpanFilter

TOML = """max_retries = 0
[models.t]
provider = "test"
model = "t"
script = ["answer"]
price = { input = 1000.0, output = 2000.0 }
max_output_tokens = 10

[keys.team]
daily_budget_usd = 0.2
"""


async def test_calls_spans_stats_and_budget(tmp_path: Path, store_url: str) -> None:
    config = load_config(write_config(tmp_path, TOML), environ={"KEEL_STORE": store_url})
    gw = Gateway(config)
    for i in range(4):
        await gw.chat(f"question {i}", model="t", key="team", max_tokens=5)
    gw._extra["t"] = TestModel(ServerError("down", status=500), model_id="t")
    gw._deployments.clear()
    with pytest.raises(ServerError):
        await gw.chat("fails", model="t", key="team", max_tokens=5)
    assert gw.flush() and gw.store is not None
    spans = gw.store.list_spans(SpanFilter(model="t"))
    assert len(spans) == 5 and sum(s.status == "error" for s in spans) == 1
    [row] = gw.store.stats()
    assert row.calls == 5 and row.errors == 1 and row.input_tokens > 0 and row.cost_usd is not None
    spent = gw.budgets.spent("team")
    assert spent == pytest.approx(row.cost_usd)
    await gw.aclose()

    again = Gateway(config)  # a restart reads the day's spend back from the store
    again._extra["t"] = TestModel("answer " * 4, model_id="t")
    with pytest.raises(errors.BudgetExceeded):
        for _ in range(100):
            await again.chat("more", model="t", key="team", max_tokens=10)
    assert again.budgets.spent("team") <= 0.2
    await again.aclose()
