"""The demo's closing summary, from facts alone (no database, no cluster). The demo
end to end and its SMTP sink: tests/integration/test_demo.py."""

from __future__ import annotations

from pathlib import Path


def test_summary_claims_no_exactly_once_for_an_external_relay(tmp_path: Path) -> None:
    from sendsystem.demo.summary import summarize

    facts = {"counts": {"sent": 2, "failed": 0}, "workers": []}
    lines: list[str] = []
    result = summarize(lines.append, facts, ["a@example.com", "b@example.com"], None, 1.0,
                       True, tmp_path / "r.html", {}, [])
    assert result.ok
    assert "exactly one" not in lines[-1]
    assert lines[-1].startswith("Result: OK - every message was accepted by the relay")
