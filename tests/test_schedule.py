"""
Rule schedules (C{when}): parsing windows, matching fixed moments around midnight, the end of
the week and Europe/Berlin's daylight-saving changes, explanations, and time zones.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pytest

from wingate_map.config._schedule import Schedule, Window, load_timezone, parse_moment, parse_window, system_timezone

BERLIN = load_timezone("Europe/Berlin")
UTC = timezone.utc


def at(text: str) -> datetime:
    """
    A wall-clock moment in Berlin.
    """
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN)


def minutes_inside(schedule: Schedule, start_utc: datetime, hours: int) -> int:
    """
    How many real minutes, from C{start_utc} for C{hours}, the schedule holds.
    """
    return sum(schedule.matches(start_utc + timedelta(minutes=m)) for m in range(hours * 60))


@pytest.mark.parametrize(
    "text, days, start, end",
    [
        ("mon-fri 07:00-19:00", {0, 1, 2, 3, 4}, 420, 1140),
        ("sat,sun 10:00-14:00", {5, 6}, 600, 840),
        ("22:00-06:00", set(range(7)), 1320, 360),
        ("fri-mon 08:00-09:30", {4, 5, 6, 0}, 480, 570),
        ("Mon,wed-thu,SUN 00:00-24:00", {0, 2, 3, 6}, 0, 1440),
        ("sun-sat 12:00-12:00", set(range(7)), 720, 720),
        ("tue-tue 23:59-00:00", {1}, 1439, 0),
        ("  mon 01:00-02:00  ", {0}, 60, 120),
    ],
)
def test_parse_window(text, days, start, end):
    """
    Windows name days (single, lists, ranges, wrapping ranges, any case) or none (every day),
    and a start and end time; 24:00 may end a window.
    """
    window = parse_window(text)
    assert window == Window(text=text, days=frozenset(days), start=start, end=end)


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "[DAYS ]HH:MM-HH:MM"),
        ("07:00", "[DAYS ]HH:MM-HH:MM"),
        ("mon-fri", "start time 'mon' is not HH:MM"),
        ("7:00-19:00", "start time '7:00' is not HH:MM"),
        ("07:00-19:60", "end time '19:60' is not HH:MM"),
        ("07:00-25:00", "end time '25:00'"),
        ("24:00-06:00", "cannot start at 24:00"),
        ("24:01-06:00", "start time '24:01' is not HH:MM between 00:00 and 24:00"),
        ("monday 07:00-19:00", "'monday' is not a day or a range of days"),
        ("mon-tue-wed 07:00-19:00", "not a day or a range"),
        ("mon,,fri 07:00-19:00", "'' is not a day"),
        ("sat, sun 10:00-14:00", "[DAYS ]HH:MM-HH:MM"),
        ("mon 07:00 - 19:00", "[DAYS ]HH:MM-HH:MM"),
        (7, "not int"),
    ],
)
def test_bad_windows(text, words):
    """
    A bad window is refused with a message saying what is wrong and what is allowed.
    """
    with pytest.raises(ValueError) as caught:
        parse_window(text)
    assert words in str(caught.value)
    if "not a day" in words:
        assert "mon, tue, wed, thu, fri, sat, sun" in str(caught.value)


def test_schedule_parse_names_the_bad_entry():
    """
    A bad window in a list is reported with its position, for the configuration key path.
    """
    with pytest.raises(ValueError, match=r"^\[1\]: 'mon 7-9'"):
        Schedule.parse(["mon-fri 07:00-19:00", "mon 7-9"], BERLIN)


def test_start_inclusive_end_exclusive():
    """
    A window holds from its start minute up to, not including, its end minute.
    """
    schedule = Schedule.parse(["mon-fri 07:00-19:00"], BERLIN)
    assert not schedule.matches(at("2024-03-04T06:59:59"))
    assert schedule.matches(at("2024-03-04T07:00"))
    assert schedule.matches(at("2024-03-08T18:59:59.999"))
    assert not schedule.matches(at("2024-03-08T19:00"))
    assert not schedule.matches(at("2024-03-09T12:00"))  # Saturday


def test_across_sunday_midnight():
    """
    C{sun 22:00-02:00} holds from Sunday 22:00 to Monday 02:00 (the day named is the day it
    starts), and at no other time of the week.
    """
    schedule = Schedule.parse(["sun 22:00-02:00"], BERLIN)
    inside = ["2024-03-03T22:00", "2024-03-03T23:59", "2024-03-04T00:00", "2024-03-04T01:59"]
    outside = ["2024-03-03T21:59", "2024-03-04T02:00", "2024-03-04T22:30", "2024-03-05T01:00", "2024-03-02T23:00"]
    for text in inside:
        assert schedule.matches(at(text)), text
    for text in outside:
        assert not schedule.matches(at(text)), text
    week = datetime(2024, 3, 4, tzinfo=UTC)
    assert minutes_inside(schedule, week, 7 * 24) == 4 * 60


def test_every_day_across_midnight_and_whole_days():
    """
    Without days a crossing window holds every night; C{00:00-24:00} and C{00:00-00:00} hold
    the whole day; C{10:00-10:00} holds 24 hours from 10:00.
    """
    nights = Schedule.parse(["22:00-06:00"], BERLIN)
    assert nights.matches(at("2024-03-06T23:00")) and nights.matches(at("2024-03-07T05:59"))
    assert not nights.matches(at("2024-03-07T06:00"))
    assert Schedule.parse(["sat 00:00-24:00"], BERLIN).matches(at("2024-03-09T23:59"))
    assert not Schedule.parse(["sat 00:00-24:00"], BERLIN).matches(at("2024-03-10T00:00"))
    assert Schedule.parse(["sat 00:00-00:00"], BERLIN).matches(at("2024-03-09T23:59"))
    day = Schedule.parse(["wed 10:00-10:00"], BERLIN)
    assert day.matches(at("2024-03-07T09:59")) and not day.matches(at("2024-03-07T10:00"))


def test_wrapping_day_range():
    """
    C{fri-mon} holds on Friday, Saturday, Sunday and Monday.
    """
    schedule = Schedule.parse(["fri-mon 09:00-10:00"], BERLIN)
    held = [d for d in range(4, 11) if schedule.matches(at(f"2024-03-{d:02d}T09:30"))]
    assert [at(f"2024-03-{d:02d}").strftime("%a") for d in held] == ["Mon", "Fri", "Sat", "Sun"]


def test_spring_forward():
    """
    On Europe/Berlin's spring-forward day (2024-03-31, 02:00 becomes 03:00) the skipped hour
    never happens: a window inside it does not hold that day, and C{01:30-03:30} holds for one
    real hour; C{07:00-19:00} still starts at 07:00 on the clock (05:00 UTC instead of 06:00).
    """
    day_start = datetime(2024, 3, 30, 23, 0, tzinfo=UTC)  # Sunday 00:00 CET
    assert minutes_inside(Schedule.parse(["sun 02:00-03:00"], BERLIN), day_start, 24) == 0
    assert minutes_inside(Schedule.parse(["sun 02:00-03:00"], BERLIN), day_start - timedelta(days=7), 24) == 60
    assert minutes_inside(Schedule.parse(["01:30-03:30"], BERLIN), day_start, 24) == 60
    workday = Schedule.parse(["07:00-19:00"], BERLIN)
    assert not workday.matches(datetime(2024, 3, 31, 4, 59, tzinfo=UTC))
    assert workday.matches(datetime(2024, 3, 31, 5, 0, tzinfo=UTC))
    assert not workday.matches(datetime(2024, 3, 30, 5, 0, tzinfo=UTC))
    assert minutes_inside(workday, day_start, 24) == 12 * 60


def test_fall_back():
    """
    On Europe/Berlin's fall-back day (2024-10-27, 03:00 becomes 02:00 again) a window covering
    the repeated hour holds through both: C{sun 02:00-03:00} holds two real hours, and the day
    has 25 hours of C{00:00-24:00}.
    """
    day_start = datetime(2024, 10, 26, 22, 0, tzinfo=UTC)  # Sunday 00:00 CEST
    repeated = Schedule.parse(["sun 02:00-03:00"], BERLIN)
    assert minutes_inside(repeated, day_start, 25) == 120
    assert repeated.matches(datetime(2024, 10, 27, 2, 30, fold=0, tzinfo=BERLIN))
    assert repeated.matches(datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=BERLIN))
    assert minutes_inside(Schedule.parse(["sun 00:00-24:00"], BERLIN), day_start, 26) == 25 * 60
    night = Schedule.parse(["sat 22:00-06:00"], BERLIN)
    assert minutes_inside(night, day_start - timedelta(hours=2), 12) == 9 * 60


def test_moments_in_other_zones_are_converted():
    """
    A moment given in UTC or another offset is judged by the wall clock in the schedule's zone;
    a naive moment is already wall-clock time there.
    """
    schedule = Schedule.parse(["mon-fri 07:00-19:00"], BERLIN)
    assert schedule.matches(datetime(2024, 3, 4, 6, 30, tzinfo=UTC))  # 07:30 CET
    assert not schedule.matches(datetime(2024, 3, 4, 18, 30, tzinfo=UTC))  # 19:30 CET
    assert schedule.matches(datetime(2024, 3, 4, 7, 30))
    tokyo = Schedule.parse(["mon-fri 07:00-19:00"], load_timezone("Asia/Tokyo"))
    assert tokyo.matches(datetime(2024, 3, 4, 6, 30, tzinfo=UTC))  # 15:30 in Tokyo
    assert not tokyo.matches(datetime(2024, 3, 4, 12, 0, tzinfo=UTC))  # 21:00 in Tokyo


def test_empty_schedule_never_holds():
    """
    A schedule without windows holds at no time.
    """
    assert not Schedule([], BERLIN).matches(at("2024-03-04T12:00"))


def test_explain():
    """
    explain names the local time and zone, and says for each window why it holds or not: the
    day is not one of its days, the time is outside its span, or the time falls in the part of
    a window that started the day before.
    """
    schedule = Schedule.parse(["mon-fri 07:00-19:00", "sun 22:00-02:00"], BERLIN)
    text = schedule.explain(datetime(2024, 3, 4, 0, 30, tzinfo=UTC))
    assert text.startswith("mon 2024-03-04 01:30 Europe/Berlin (+0100) is inside the schedule")
    assert "'mon-fri 07:00-19:00' does not hold: 01:30 is outside 07:00-19:00 on mon" in text
    assert "'sun 22:00-02:00' holds: 01:30 is before 02:00, the end of the window that started sun 22:00" in text
    text = schedule.explain(at("2024-03-09T08:00"))
    assert "is outside the schedule" in text
    assert "'mon-fri 07:00-19:00' does not hold: sat is not one of its days" in text
    text = schedule.explain(at("2024-03-04T03:00"))
    assert "'sun 22:00-02:00' does not hold: 03:00 is not before 02:00, when the window that started sun 22:00 ended" in text
    text = schedule.explain(at("2024-03-05T12:00"))
    assert "'mon-fri 07:00-19:00' holds: 12:00 is in 07:00-19:00 on tue" in text
    assert "'22:00-06:00' holds: 23:00 is in 22:00-06:00 (to the next day) on wed" in Schedule.parse(
        ["22:00-06:00"], BERLIN
    ).explain(at("2024-03-06T23:00"))
    text = Schedule.parse(["mon 07:00-19:00"], BERLIN).explain(at("2024-10-27T02:30"))
    assert "sun 2024-10-27 02:30 Europe/Berlin (+0200)" in text


def test_load_timezone():
    """
    IANA names load with their daylight-saving rules; anything else is refused with a message
    saying what is allowed.
    """
    assert load_timezone("UTC").utcoffset(datetime(2024, 7, 1)) == timedelta(0)
    assert BERLIN.utcoffset(datetime(2024, 7, 1)) == timedelta(hours=2)
    for bad in ["Mars/Olympus", "", "../../etc/passwd", "/etc/localtime", "Europe/Berlin\x00", 5]:
        with pytest.raises(ValueError, match="IANA time zone name such as 'Europe/Berlin'"):
            load_timezone(bad)


def test_system_timezone(tmp_path):
    """
    The default zone is the system's: C{$TZ} when it names a zone, else the zone
    C{/etc/localtime} links to (with its daylight-saving rules), else UTC.
    """
    link = tmp_path / "localtime"
    os.symlink("/usr/share/zoneinfo/Europe/Berlin", link)
    zone = system_timezone({}, str(link))
    assert str(zone) == "Europe/Berlin"
    assert zone.utcoffset(datetime(2024, 7, 1)) == timedelta(hours=2)
    assert zone.utcoffset(datetime(2024, 1, 1)) == timedelta(hours=1)
    assert str(system_timezone({"TZ": ":Asia/Tokyo"}, str(link))) == "Asia/Tokyo"
    assert str(system_timezone({"TZ": "Nowhere/Special"}, str(link))) == "Europe/Berlin"
    assert system_timezone({}, str(tmp_path / "missing")) == timezone.utc
    assert load_timezone(None) is not None


def test_parse_moment():
    """
    C{--at} takes ISO 8601; without an offset the time is wall-clock time in the zone.
    """
    assert parse_moment("2024-03-31T02:30", BERLIN) == datetime(2024, 3, 31, 2, 30, tzinfo=BERLIN)
    assert parse_moment("2024-03-31 02:30", BERLIN).tzinfo is BERLIN
    assert parse_moment("2024-03-31T02:30+00:00", BERLIN).utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_moment("tomorrow", BERLIN)
