"""Report usage: `python usage.py` for the class, `python usage.py EMAIL` for one."""

import csv
import io
import json
import os
from datetime import UTC, datetime, timedelta

import click

from config import ConfigError, get_data_path, load_settings
from keys import KeysFileError, index_students, parse_keys
from periods import get_zone, list_day_ranges, start_of_day, to_local_day, to_utc_text
from reports import (
    empty_person,
    find_first_date,
    find_person,
    hide_keys,
    open_store,
    summarize_days,
    summarize_models,
    summarize_students,
    to_csv_cell,
)

DAY = click.DateTime(formats=["%Y-%m-%d"])

COLUMNS = (
    ("name", "Name"),
    ("email", "E-mail"),
    ("requests", "Requests"),
    ("prompt_tokens", "Prompt"),
    ("completion_tokens", "Completion"),
    ("total_tokens", "Total"),
)


def load_data():
    """Return (usage.sqlite connection, students in keys.json)."""
    try:
        settings = load_settings(require_api_key=False)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error

    usage_path = get_data_path(settings, "usage.sqlite")
    if not usage_path.exists():
        raise click.ClickException(
            f"no usage recorded yet: {usage_path} does not exist"
        )

    keys_path = get_data_path(settings, "keys.json")
    try:
        with open(keys_path, encoding="utf-8") as file:
            entries = parse_keys(file.read(), keys_path)
    except FileNotFoundError:
        entries = []
    except KeysFileError as error:
        raise click.ClickException(str(error)) from error

    return open_store(str(usage_path)), list(index_students(entries).values())


def format_table(rows, columns):
    """Return rows of dicts as an aligned text table; numbers right-aligned."""
    cells = [[title for _, title in columns]]
    cells += [[_format_cell(row[name]) for name, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [isinstance(rows[0][name], int) if rows else False for name, _ in columns]
    lines = []
    for line in cells:
        parts = [
            cell.rjust(width) if is_number else cell.ljust(width)
            for cell, width, is_number in zip(line, widths, numeric)
        ]
        lines.append("  ".join(parts).rstrip())

    lines.insert(1, "  ".join("-" * width for width in widths))
    return os.linesep.join(lines)


def _format_cell(value):
    if value is None:
        return "-"

    return f"{value:,}" if isinstance(value, int) else str(value)


@click.command()
@click.argument("email", required=False)
@click.option("--since", type=DAY, help="Count from this day on (YYYY-MM-DD).")
@click.option("--until", type=DAY, help="Count up to this day, included (YYYY-MM-DD).")
@click.option(
    "--by",
    "group",
    type=click.Choice(["student", "day", "model"]),
    default="student",
    show_default=True,
    help="One row per student, per day or per model.",
)
@click.option("--csv", "output", flag_value="csv", help="Print CSV instead of a table.")
@click.option(
    "--json", "output", flag_value="json", help="Print JSON instead of a table."
)
@click.option(
    "--tz", "zone_name", default="UTC", show_default=True, help="Time zone of the days."
)
def main(email, since, until, group, output, zone_name):
    """Print token usage per student, or one student's (EMAIL) usage.

    The usage page's JSON endpoints read the same queries, so both agree.
    """
    zone = _get_zone(zone_name)
    window = _to_window(since, until, zone)
    connection, students = load_data()
    person = _find_person(connection, students, email) if email else None
    rows = _collect_rows(connection, students, group, person, window, zone)
    if output == "json":
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    elif output == "csv":
        click.echo(_format_csv(rows, _list_columns(group)), nl=False)
    elif group == "student" and person is not None:
        _echo_person(connection, person, rows, window)
    else:
        click.echo(format_table(rows, _list_columns(group)) if rows else "no usage")


def _get_zone(name):
    try:
        return get_zone(name)
    except ValueError as error:
        raise click.ClickException(str(error)) from error


def _to_window(since, until, zone):
    if since and until and until.date() < since.date():
        raise click.ClickException("--until is before --since: swap the dates")

    start = start_of_day(since.date(), zone) if since else None
    stop = start_of_day(until.date() + timedelta(days=1), zone) if until else None
    return start, stop


def _collect_rows(connection, students, group, person, window, zone):
    fingerprints = person["keys"] if person else None
    if group == "model":
        return summarize_models(connection, fingerprints, *window)

    if group == "day":
        ranges = _list_days(connection, fingerprints, window, zone)
        return summarize_days(connection, ranges, fingerprints)

    people = summarize_students(connection, students, *window)
    if person is not None:
        wanted = person["email"].lower()
        people = [other for other in people if other["email"].lower() == wanted]

    return [hide_keys(other) for other in people]


def _list_days(connection, fingerprints, window, zone):
    since, until = window
    first = since or find_first_date(connection, fingerprints, until=until)
    last = until or to_utc_text(datetime.now(UTC))
    if first is None:
        return []

    # `until` is the start of the day after the last one shown.
    last_day = to_local_day(last, zone) - timedelta(days=1 if until else 0)
    return list_day_ranges(to_local_day(first, zone), last_day, zone)


def _list_columns(group):
    if group == "model":
        return (("model", "Model"), *COLUMNS[2:])

    if group == "day":
        return (("date", "Day"), *COLUMNS[2:])

    return (*COLUMNS, ("last_seen", "Last seen (UTC)"))


def _format_csv(rows, columns):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in columns])
    for row in rows:
        writer.writerow([to_csv_cell(row[name]) for name, _ in columns])

    return buffer.getvalue()


def _echo_person(connection, person, rows, window):
    # The person has no row when none of their usage falls in the window.
    figures = rows[0] if rows else empty_person(person["name"], person["email"])
    click.echo(f"{person['name']} <{person['email']}>")
    click.echo(format_table([figures], COLUMNS[2:]))
    models = summarize_models(connection, person["keys"], *window)
    if models:
        click.echo()
        click.echo(format_table(models, _list_columns("model")))


def _find_person(connection, students, email):
    person = find_person(connection, students, email)
    if person is None:
        raise click.ClickException(
            f"no student with e-mail {email} in keys.json or usage"
        )

    return person


if __name__ == "__main__":
    main()
