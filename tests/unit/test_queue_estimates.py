"""The planner-style estimate behind the sent, error and cancelled queue gauges."""

from __future__ import annotations

from outbox.store import estimate_count


def test_never_analysed_gives_no_figure() -> None:
    assert estimate_count("sent", -1.0, None, None, None, None) is None
    # Rows counted by VACUUM but no column statistics yet: still no figure.
    assert estimate_count("sent", 1000.0, None, None, None, None) is None


def test_an_empty_analysed_table_counts_zero() -> None:
    assert estimate_count("error", 0.0, None, None, None, None) == 0


def test_a_common_value_gets_its_share() -> None:
    stats = (10_000.0, 0.0, 3.0, ["sent", "pending"], [0.9, 0.08])
    assert estimate_count("sent", *stats) == 9000
    assert estimate_count("pending", *stats) == 800


def test_a_rare_value_gets_an_even_part_of_the_rest() -> None:
    # 3 distinct values, 2 common ones covering 98 %: the third has the other 2 %.
    stats = (10_000.0, 0.0, 3.0, ["sent", "pending"], [0.9, 0.08])
    assert estimate_count("error", *stats) == 200
    # A negative n_distinct is a fraction of the rows (here 4 distinct: 2 others share).
    stats = (10_000.0, 0.0, -0.0004, ["sent", "pending"], [0.9, 0.08])
    assert estimate_count("cancelled", *stats) == 100


def test_no_room_left_means_zero() -> None:
    # Every distinct value is in the list: a value not in it does not occur.
    assert estimate_count("cancelled", 7.0, 0.0, 2.0, ["sent", "error"], [5 / 7, 2 / 7]) == 0
