from __future__ import annotations

import pytest

from op_celery._exceptions import ConfigurationError
from op_celery._rates import DEFAULT_BURST, Rate, parse_burst, parse_rate, with_headroom


@pytest.mark.parametrize(
    ("text", "limit", "period_s"),
    [
        ("50/s", 50, 1.0),
        ("3000/m", 3000, 60.0),
        ("100/h", 100, 3600.0),
        ("100/10s", 100, 10.0),
        ("5/500ms", 5, 0.5),
        ("20/2m", 20, 120.0),
        ("7/1s", 7, 1.0),
        ("50", 50, 1.0),
        (" 50 / s ", 50, 1.0),
    ],
)
def test_parse_rate_accepts_celery_forms_and_counted_periods(
    text: str, limit: int, period_s: float
) -> None:
    assert parse_rate(text) == Rate(limit=limit, period_s=period_s)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "50/x", "50/d", "0/s", "50/0s", "-5/s", "0.5/s", "50/1.5s", "50/s/s", "/s", "5/"],
)
def test_parse_rate_refuses_other_strings_naming_the_setting_and_the_forms(text: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_rate(text)
    message = str(caught.value)
    assert "OPENPANEL_RATE_LIMIT" in message
    assert '"50/s"' in message
    assert '"100/10s"' in message


def test_parse_rate_refuses_a_non_string() -> None:
    with pytest.raises(ConfigurationError, match="OPENPANEL_RATE_LIMIT"):
        parse_rate(50)  # type: ignore[arg-type]


def test_parse_rate_names_the_setting_it_was_given() -> None:
    with pytest.raises(ConfigurationError, match=r"OPENPANEL_PROJECTS\[shop\]"):
        parse_rate("fast", setting="OPENPANEL_PROJECTS[shop]")


def test_rate_per_second() -> None:
    assert parse_rate("3000/m").per_second == 50.0
    assert parse_rate("5/500ms").per_second == 10.0
    assert parse_rate("100/10s").per_second == 10.0


@pytest.mark.parametrize("text", ["50/s", "3000/m", "100/h", "100/10s", "5/500ms", "20/2m"])
def test_rate_str_reads_back_as_the_same_rate(text: str) -> None:
    assert str(parse_rate(text)) == text
    assert parse_rate(str(parse_rate(text))) == parse_rate(text)


@pytest.mark.parametrize(("limit", "period_s"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0)])
def test_rate_refuses_a_rate_that_allows_nothing(limit: int, period_s: float) -> None:
    with pytest.raises(ValueError, match="limit >= 1 and period_s > 0"):
        Rate(limit=limit, period_s=period_s)


def test_rate_is_frozen() -> None:
    rate = parse_rate("50/s")
    with pytest.raises(AttributeError):
        rate.limit = 10  # type: ignore[misc]


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("10", 10), (" 3 ", 3), (5, 5)])
def test_parse_burst_accepts_whole_numbers_from_one(value: str | int, expected: int) -> None:
    assert parse_burst(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "x", "", "1.5", 0, -3, True, "²"])
def test_parse_burst_refuses_others_naming_the_setting(value: str | int) -> None:
    with pytest.raises(ConfigurationError, match="OPENPANEL_RATE_BURST"):
        parse_burst(value)


def test_default_burst_admits_one_at_a_time() -> None:
    assert DEFAULT_BURST == 1


def test_headroom_paces_a_rate_a_little_below_its_limit() -> None:
    slowed = with_headroom(parse_rate("50/s"), 1.0)
    assert abs(slowed.per_second - 49.5) < 1e-9
    assert with_headroom(parse_rate("3000/m"), 0) == parse_rate("3000/m")
    assert abs(with_headroom(parse_rate("100/10s"), 2.5).per_second - 9.75) < 1e-9
