"""A test suite for the demo app (examples/demo_app.py) built on ductwork.run_inline: no supervisor, no fixture,
no database to set up. With nothing configured, run_inline uses a private temporary SQLite database.

    python -m pytest examples/testing
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import demo_app  # noqa: E402

import ductwork  # noqa: E402


def test_enrich_users_gathers_every_user_in_element_order():
    run = ductwork.run_inline(demo_app.EnrichUsers, 3)
    assert run.status == "completed"
    assert run.output == {"source": "crm", "users": ["user-1", "user-2", "user-3"], "total_score": 60}


def test_orders_retries_the_discount_without_waiting_for_the_retry_delay():
    run = ductwork.run_inline(demo_app.Orders, 2)   # Discount fails its first attempt, by design
    assert run.output == {"total_cents": 2471, "in_stock": True, "missing": [], "status": "ready"}


def test_orders_with_the_stock_check_swapped_for_a_stand_in():
    run = ductwork.run_inline(demo_app.Orders, 2, steps={"check_stock": lambda line: {"sku": line["sku"], "ok": False}})
    assert run.output["status"] == "backorder"
    assert run.output["in_stock"] is False


def test_text_stats_divides_and_combines():
    run = ductwork.run_inline(demo_app.TextStats, "The quick brown fox")
    assert run.output == {"words": 4, "vowels": 5, "longest": "quick"}


def test_triage_takes_the_branch_its_classification_names():
    assert ductwork.run_inline(demo_app.Triage, 42).output == "approved by auto"
    assert ductwork.run_inline(demo_app.Triage, 500).output == "review by reviewer-1"
    assert ductwork.run_inline(demo_app.Triage, -1).output.startswith("rejected by auto")


def test_squares_leaves_its_fan_out_open():
    assert ductwork.run_inline(demo_app.Squares, 4).output == [0, 1, 4, 9]
