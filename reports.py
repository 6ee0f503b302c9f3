"""Usage figures from usage.sqlite: per person, model, day; budgets; reports.

Both usage.py and the usage page's JSON endpoints read through this module,
so the script and the page always show the same figures.

Rows name the student by key fingerprint; keys.json turns that into the
name and e-mail the teacher knows, and rows whose key is no longer in
keys.json fall back to the name and e-mail stored with them. A person is
everyone sharing one e-mail, so a replaced key keeps its history.

`since` and `until` are UTC text dates (see periods.py): rows with
since <= date < until count.
"""

import csv
from datetime import timedelta

import db
from keys import is_admin
from periods import (
    get_start_of_week,
    get_today,
    list_day_ranges,
    start_of_day,
)

FIGURES = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
SUMS = "COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens)"
TOTALS = f"SELECT {SUMS} FROM usage_log{{where}}"
TOTALS_BY_KEY = (
    f"SELECT api_key, MAX(email), MAX(name), {SUMS}, MAX(date)"
    " FROM usage_log{where} GROUP BY api_key"
)
TOTALS_BY_MODEL = (
    f"SELECT COALESCE(model, '(none)'), {SUMS}"
    " FROM usage_log{where} GROUP BY 1 ORDER BY 5 DESC, 1"
)
# One row per local day, empty days included: the days are joined to the rows.
TOTALS_BY_DAY = (
    "WITH days(day, day_start, day_stop) AS (VALUES {days})"
    " SELECT day, COUNT(id), SUM(prompt_tokens), SUM(completion_tokens),"
    " SUM(total_tokens) FROM days LEFT JOIN usage_log"
    " ON date >= day_start AND date < day_stop{keys} GROUP BY day ORDER BY day"
)
RECENT = (
    "SELECT date, method, endpoint, model, prompt_tokens, completion_tokens,"
    " total_tokens, status, duration_ms, streamed, partial"
    " FROM usage_log{where} ORDER BY date DESC, id DESC LIMIT ?"
)
FIRST_DATE = "SELECT MIN(date) FROM usage_log{where}"
RECENT_LIMIT = 20
CHART_DAYS = 30
CLASS_CSV_COLUMNS = (
    "name",
    "email",
    "requests",
    "tokens_today",
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "daily_budget_left",
    "total_budget_left",
    "last_seen",
)


def open_store(path):
    """Open usage.sqlite for reading, migrating a Node-era file first."""
    db.init_db(path)
    return db.connect(path)


def _where(fingerprints=None, since=None, until=None):
    clauses, params = [], []
    if fingerprints is not None:
        clauses.append(f"api_key IN ({', '.join('?' for _ in fingerprints)})")
        params.extend(fingerprints)

    if since is not None:
        clauses.append("date >= ?")
        params.append(since)

    if until is not None:
        clauses.append("date < ?")
        params.append(until)

    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _figures(values):
    count, *sums = values
    return dict(zip(FIGURES, (count, *(value or 0 for value in sums))))


def summarize(connection, fingerprints=None, since=None, until=None):
    """Return requests and tokens of the matching rows (all keys when None)."""
    where, params = _where(fingerprints, since, until)
    return _figures(connection.execute(TOTALS.format(where=where), params).fetchone())


def summarize_students(connection, students, since=None, until=None):
    """Return one dict per person with usage, largest total first.

    `students` are the keys.Student entries in force, listed even with no
    usage; a student with more than one key (a key replaced) is one person,
    joined by e-mail. `keys` holds the person's key fingerprints.
    """
    by_fingerprint = {student.fingerprint: student for student in students}
    people = {}
    for student in students:
        person = people.setdefault(
            student.email.lower(), empty_person(student.name, student.email)
        )
        person["keys"].append(student.fingerprint)

    where, params = _where(since=since, until=until)
    for fingerprint, email, name, *sums, last in connection.execute(
        TOTALS_BY_KEY.format(where=where), params
    ):
        _add_key_usage(people, by_fingerprint, fingerprint, email, name, sums, last)

    return sorted(people.values(), key=lambda p: (-p["total_tokens"], p["email"]))


def _add_key_usage(people, by_fingerprint, fingerprint, email, name, sums, last):
    student = by_fingerprint.get(fingerprint)
    if student is not None:
        name, email = student.name, student.email

    email = email or f"(unknown key {fingerprint[7:15]})"
    person = people.setdefault(email.lower(), empty_person(name or "?", email))
    if fingerprint not in person["keys"]:
        person["keys"].append(fingerprint)

    for figure, value in _figures(sums).items():
        person[figure] += value

    person["last_seen"] = max(filter(None, (person["last_seen"], last)), default=None)


def find_person(connection, students, email):
    """Return the person with this e-mail (their keys and totals), or None."""
    wanted = email.strip().lower()
    for person in summarize_students(connection, students):
        if person["email"].lower() == wanted:
            return person

    return None


def summarize_models(connection, fingerprints=None, since=None, until=None):
    """Return per-model usage for the given key fingerprints (None: everyone)."""
    where, params = _where(fingerprints, since, until)
    return [
        {"model": model, **_figures(sums)}
        for model, *sums in connection.execute(
            TOTALS_BY_MODEL.format(where=where), params
        )
    ]


def summarize_days(connection, day_ranges, fingerprints=None):
    """Return usage per local day, one entry per (day, start, stop) range."""
    if not day_ranges:
        return []

    days = ", ".join("(?, ?, ?)" for _ in day_ranges)
    params = [value for day_range in day_ranges for value in day_range]
    keys = ""
    if fingerprints is not None:
        keys = f" AND api_key IN ({', '.join('?' for _ in fingerprints)})"
        params.extend(fingerprints)

    query = TOTALS_BY_DAY.format(days=days, keys=keys)
    return [
        {"date": day, **_figures(sums)}
        for day, *sums in connection.execute(query, params)
    ]


def find_first_date(connection, fingerprints=None, since=None, until=None):
    """Return the UTC text date of the earliest matching row, or None."""
    where, params = _where(fingerprints, since, until)
    return connection.execute(FIRST_DATE.format(where=where), params).fetchone()[0]


def list_recent(connection, fingerprints, limit=RECENT_LIMIT):
    """Return the latest requests of these keys, newest first."""
    where, params = _where(fingerprints)
    cursor = connection.execute(RECENT.format(where=where), [*params, limit])
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def empty_person(name, email):
    """Return a person's figures before any usage is added."""
    return {
        "name": name,
        "email": email,
        "keys": [],
        **dict.fromkeys(FIGURES, 0),
        "last_seen": None,
    }


def build_student_report(connection, students, student, zone, budget_of, now=None):
    """Return everything the usage page shows a student about themselves.

    `budget_of(student)` gives a student's budget status (see budgets.py).
    """
    person = find_person(connection, students, student.email)
    keys = person["keys"] if person else [student.fingerprint]
    day = get_today(zone, now)
    return {
        "name": student.name,
        "email": student.email,
        "role": "admin" if is_admin(student) else "student",
        "disabled": student.disabled,
        "time_zone": zone.key,
        "periods": {
            "today": summarize(connection, keys, since=start_of_day(day, zone)),
            "week": summarize(
                connection, keys, since=start_of_day(get_start_of_week(day), zone)
            ),
            "total": summarize(connection, keys),
        },
        "days": summarize_days(connection, list_chart_days(day, zone), keys),
        "models": summarize_models(connection, keys),
        "budget": budget_of(student),
        "recent": list_recent(connection, keys),
    }


def build_class_report(connection, students, zone, budget_of, now=None):
    """Return the teacher's view: every person, and totals per model and day."""
    day = get_today(zone, now)
    people = summarize_students(connection, students)
    today = summarize_students(connection, students, since=start_of_day(day, zone))
    tokens_today = {person["email"].lower(): person["total_tokens"] for person in today}
    current = _index_current_students(students)
    for person in people:
        person["tokens_today"] = tokens_today.get(person["email"].lower(), 0)
        student = current.get(person["email"].lower())
        person["budget"] = budget_of(student) if student is not None else None

    return {
        "time_zone": zone.key,
        "totals": summarize(connection),
        "students": [hide_keys(person) for person in people],
        "models": summarize_models(connection),
        "days": summarize_days(connection, list_chart_days(day, zone)),
    }


def _index_current_students(students):
    # A person's budget is their enabled key's, if they have one.
    current = {}
    for student in sorted(students, key=lambda s: not s.disabled):
        current.setdefault(student.email.lower(), student)

    return current


def list_chart_days(today, zone):
    """Return the day ranges of the page's chart: the last CHART_DAYS days."""
    return list_day_ranges(today - timedelta(days=CHART_DAYS - 1), today, zone)


def hide_keys(person):
    """Return a person without their key fingerprints, for output."""
    return {name: value for name, value in person.items() if name != "keys"}


def write_class_csv(people, file):
    """Write the class table (build_class_report's `students`) as CSV."""
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(CLASS_CSV_COLUMNS)
    for person in people:
        budget = person["budget"] or {"daily": {}, "total": {}}
        row = {
            **person,
            "daily_budget_left": budget["daily"].get("remaining"),
            "total_budget_left": budget["total"].get("remaining"),
        }
        writer.writerow([to_csv_cell(row[name]) for name in CLASS_CSV_COLUMNS])


def to_csv_cell(value):
    """Return a value as a CSV cell a spreadsheet shows but never runs."""
    if value is None:
        return ""

    # A spreadsheet would run a name like "=HYPERLINK(...)" as a formula.
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value

    return value
