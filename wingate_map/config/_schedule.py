"""
Rule schedules: the C{when} condition, a list of weekly time windows such as
C{"mon-fri 07:00-19:00"}, C{"sat,sun 10:00-14:00"} or C{"22:00-06:00"}, read in the
C{[service] timezone}.

A window is C{[DAYS ]HH:MM-HH:MM}.  DAYS are comma-separated days or ranges of C{mon}..C{sun}
(ranges may wrap: C{fri-mon} is Friday to Monday); without DAYS a window holds every day.  A window
is [start, end): it holds from the start minute up to, not including, the end minute; C{24:00} may
end a window.  An end at or before the start crosses midnight, and the day named is the day it
starts: C{"sun 22:00-02:00"} holds Sunday 22:00 to Monday 02:00.  C{"00:00-00:00"} holds 24 hours.

Times are wall-clock times in the zone: a moment is converted to the zone's local time and that
time is compared.  So across daylight-saving changes a window follows the clock on the wall: on
the spring-forward day the skipped hour never happens (a window inside it does not hold that day),
and on the fall-back day a window covering the repeated hour holds through both of them.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone, tzinfo
from typing import Iterable, Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from attrs import frozen

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

FORM = (
    "expected '[DAYS ]HH:MM-HH:MM' such as 'mon-fri 07:00-19:00', 'sat,sun 10:00-14:00' or "
    "'22:00-06:00', DAYS being days or ranges of mon..sun separated by commas"
)

_WINDOW = re.compile(r"(?:(?P<days>\S+)\s+)?(?P<start>\S+?)-(?P<end>\S+)")
_TIME = re.compile(r"(\d\d):(\d\d)")

_MINUTES_PER_DAY = 24 * 60


@frozen
class Window:
    """
    One weekly time window.

    @ivar text: the window as written.
    @ivar days: the weekdays (0 = Monday) on which the window I{starts}.
    @ivar start: minutes after midnight, 0-1439.
    @ivar end: minutes after midnight, 1-1440; at or before C{start} it is on the next day.
    """

    text: str
    days: frozenset[int]
    start: int
    end: int

    @property
    def crosses_midnight(self) -> bool:
        """
        Whether the window ends on the day after it starts.
        """
        return self.end <= self.start

    def matches(self, wall: datetime) -> bool:
        """
        Whether the wall-clock time C{wall} (its date and time of day; any tzinfo is ignored)
        is inside the window.
        """
        return self._started_on(wall) is not None

    def explain(self, wall: datetime) -> str:
        """
        Why the wall-clock time C{wall} is or is not inside the window, in one phrase.
        """
        started = self._started_on(wall)
        if started is not None:
            if started == wall.weekday():
                return f"{self.text!r} holds: {_clock(wall)} is in {self._span()} on {_day(started)}"
            return (
                f"{self.text!r} holds: {_clock(wall)} is before {_hhmm(self.end)}, the end of the "
                f"window that started {_day(started)} {_hhmm(self.start)}"
            )
        day = wall.weekday()
        yesterday = (day - 1) % 7
        if self.crosses_midnight and yesterday in self.days and day not in self.days:
            return (
                f"{self.text!r} does not hold: {_clock(wall)} is not before {_hhmm(self.end)}, when "
                f"the window that started {_day(yesterday)} {_hhmm(self.start)} ended"
            )
        if day not in self.days:
            return f"{self.text!r} does not hold: {_day(day)} is not one of its days"
        return f"{self.text!r} does not hold: {_clock(wall)} is outside {self._span()} on {_day(day)}"

    def _started_on(self, wall: datetime) -> int | None:
        """
        The weekday on which the window holding C{wall} started, or C{None}.
        """
        minute = wall.hour * 60 + wall.minute
        day = wall.weekday()
        if not self.crosses_midnight:
            return day if day in self.days and self.start <= minute < self.end else None
        if day in self.days and minute >= self.start:
            return day
        yesterday = (day - 1) % 7
        if yesterday in self.days and minute < self.end:
            return yesterday
        return None

    def _span(self) -> str:
        span = f"{_hhmm(self.start)}-{_hhmm(self.end)}"
        return f"{span} (to the next day)" if self.crosses_midnight else span


def parse_window(text: object) -> Window:
    """
    The window C{text} describes.

    @raise ValueError: saying what is wrong and what is allowed.
    """
    if not isinstance(text, str):
        raise ValueError(f"{FORM}; not {type(text).__name__}")
    match = _WINDOW.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r}: {FORM}")
    days_text = match.group("days")
    days = _parse_days(days_text, text) if days_text is not None else frozenset(range(7))
    start = _parse_time(match.group("start"), text, "start")
    end = _parse_time(match.group("end"), text, "end")
    if start == _MINUTES_PER_DAY:
        raise ValueError(f"{text!r}: a window cannot start at 24:00; use 00:00 (of the next day)")
    return Window(text=text, days=days, start=start, end=end)


def _parse_days(days_text: str, text: str) -> frozenset[int]:
    """
    The weekdays named by C{days_text} (C{mon-fri}, C{sat,sun}, C{fri-mon}).
    """
    days: set[int] = set()
    for part in days_text.split(","):
        ends = part.split("-")
        if len(ends) > 2 or not all(e.lower() in DAY_NAMES for e in ends):
            raise ValueError(
                f"{text!r}: {part!r} is not a day or a range of days; days are "
                f"{', '.join(DAY_NAMES)} and ranges are written like mon-fri or fri-mon"
            )
        first, last = (DAY_NAMES.index(e.lower()) for e in (ends[0], ends[-1]))
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(days)


def _parse_time(value: str, text: str, which: str) -> int:
    """
    Minutes after midnight for C{HH:MM} (00:00-23:59, or 24:00).
    """
    match = _TIME.fullmatch(value)
    if match is not None:
        hours, minutes = int(match.group(1)), int(match.group(2))
        if (hours < 24 and minutes < 60) or (hours == 24 and minutes == 0):
            return hours * 60 + minutes
    raise ValueError(f"{text!r}: {which} time {value!r} is not HH:MM between 00:00 and 24:00")


class Schedule:
    """
    The windows of one C{when} condition in one time zone: it holds when any window does.
    """

    def __init__(self, windows: Iterable[Window], tz: tzinfo) -> None:
        self.windows = tuple(windows)
        self.tz = tz

    @classmethod
    def parse(cls, texts: Iterable[str], tz: tzinfo) -> "Schedule":
        """
        A schedule from window texts.

        @raise ValueError: for the first bad window, naming its position (C{[1]: ...}).
        """
        windows = []
        for index, text in enumerate(texts):
            try:
                windows.append(parse_window(text))
            except ValueError as e:
                raise ValueError(f"[{index}]: {e}") from None
        return cls(windows, tz)

    def wall_clock(self, when: datetime) -> datetime:
        """
        C{when} as wall-clock time in the schedule's zone; a naive C{when} already is one.
        """
        if when.tzinfo is None:
            return when.replace(tzinfo=self.tz)
        return when.astimezone(self.tz)

    def matches(self, when: datetime) -> bool:
        """
        Whether the moment C{when} is inside one of the windows.
        """
        wall = self.wall_clock(when)
        return any(window.matches(wall) for window in self.windows)

    def explain(self, when: datetime) -> str:
        """
        Why C{when} is or is not inside the schedule: the local time, then each window's
        verdict (for C{wingatemap explain --at}).
        """
        wall = self.wall_clock(when)
        verdict = "inside" if self.matches(when) else "outside"
        head = f"{_day(wall.weekday())} {wall:%Y-%m-%d %H:%M} {zone_name(self.tz)} ({wall:%z}) is {verdict} the schedule"
        return "; ".join([head, *(window.explain(wall) for window in self.windows)])


def load_timezone(name: str | None = None) -> tzinfo:
    """
    The time zone called C{name} (an IANA name such as C{Europe/Berlin} or C{UTC}), or the
    system's local zone when C{name} is C{None} (see L{system_timezone}).

    @raise ValueError: when there is no such zone, saying what is allowed.
    """
    if name is None:
        return system_timezone()
    allowed = "use an IANA time zone name such as 'Europe/Berlin', 'America/New_York' or 'UTC'"
    if not isinstance(name, str) or not name:
        raise ValueError(f"expected a time zone name: {allowed}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}: {allowed}") from None


def system_timezone(environ: Mapping[str, str] | None = None, localtime: str = "/etc/localtime") -> tzinfo:
    """
    The system's local zone, with its daylight-saving rules: C{$TZ} when it names an IANA
    zone, else the zone file C{/etc/localtime} (named after its link target when it is one),
    else UTC.
    """
    environ = os.environ if environ is None else environ
    name = environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open(localtime, "rb") as f:
            key = _zone_key(os.path.realpath(localtime))
            return ZoneInfo.from_file(f, key=key)
    except (OSError, ValueError):
        return timezone.utc


def _zone_key(path: str) -> str:
    """
    The IANA name of the zone file at C{path} (the part after C{zoneinfo/}), or C{localtime}.
    """
    marker = "zoneinfo/"
    return path.split(marker, 1)[1] if marker in path else "localtime"


def zone_name(tz: tzinfo) -> str:
    """
    A readable name for C{tz}: its IANA name when known.
    """
    key = getattr(tz, "key", None)
    return key if key else (tz.tzname(None) or str(tz))


def parse_moment(text: str, tz: tzinfo) -> datetime:
    """
    The moment C{text} names, for C{wingatemap explain --at}: ISO 8601 such as
    C{2024-03-31T02:30}, C{2024-03-31 02:30} or C{2024-03-31T02:30+02:00}; without an offset,
    a wall-clock time in C{tz}.

    @raise ValueError: naming the accepted forms.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(
            f"{text!r} is not a time: expected ISO 8601 such as '2024-03-31T02:30' (in the "
            "configured timezone) or '2024-03-31T02:30+02:00'"
        ) from None
    return moment.replace(tzinfo=tz) if moment.tzinfo is None else moment


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _clock(wall: datetime) -> str:
    return f"{wall:%H:%M}"


def _day(weekday: int) -> str:
    return DAY_NAMES[weekday]

