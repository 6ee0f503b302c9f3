"""Local days as ranges of UTC text, to group usage rows by a reader's day.

Rows store `date` as ISO 8601 UTC text (`2025-03-01T08:15:02.123Z`), which
sorts as time does. A local day becomes the half-open range [start, stop)
in that same text form, computed with zoneinfo, so a daylight-saving day
has its 23 or 25 hours and SQLite compares plain strings on its index.
"""

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def get_zone(name):
    """Return the ZoneInfo for an IANA name; raise ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ValueError(
            f"unknown time zone {name!r}: use a name like Europe/Paris"
        ) from error


def to_utc_text(moment):
    """Return an aware datetime as usage.sqlite's UTC text."""
    utc = moment.astimezone(UTC)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def start_of_day(day, zone):
    """Return the UTC text of local midnight starting `day` in `zone`."""
    return to_utc_text(datetime.combine(day, time(), tzinfo=zone))


def get_today(zone, now=None):
    """Return the current date in `zone` (`now` is an aware datetime for tests)."""
    return (now or datetime.now(UTC)).astimezone(zone).date()


def get_start_of_week(day):
    """Return the Monday of `day`'s ISO week."""
    return day - timedelta(days=day.weekday())


def list_day_ranges(first, last, zone):
    """Return (day, start, stop) for each local day from `first` to `last`."""
    ranges = []
    day = first
    while day <= last:
        following = day + timedelta(days=1)
        ranges.append(
            (day.isoformat(), start_of_day(day, zone), start_of_day(following, zone))
        )
        day = following

    return ranges


def to_local_day(utc_text, zone):
    """Return the local date of a stored UTC text date."""
    moment = datetime.fromisoformat(utc_text.replace("Z", "+00:00"))
    return moment.astimezone(zone).date()
