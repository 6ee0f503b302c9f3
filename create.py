"""Make student keys: `python create.py NAME EMAIL` or `--csv roster.csv`.

Also switches a student off and on: `--disable EMAIL`, `--enable EMAIL`.
"""

import csv
import io
import json

import click

from config import ConfigError, get_data_path, load_settings
from keys import KeysFileError, generate_key, is_day, is_valid_email, update_keys


def get_keys_path():
    """Return the keys.json the proxy uses, as config.json places it."""
    try:
        settings = load_settings(require_api_key=False)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error

    return str(get_data_path(settings, "keys.json"))


def add_students(path, people, extra=None):
    """Add (name, email) pairs not yet in keys.json; return (added, skipped).

    `extra` holds fields every new entry gets (budgets, expiry).
    """

    def change(entries):
        known = {entry["email"].lower() for entry in entries}
        added, skipped = [], []
        for name, email in people:
            if email.lower() in known:
                skipped.append(email)
                continue

            entry = {
                "key": generate_key(),
                "name": name,
                "email": email,
                **(extra or {}),
            }
            entries.append(entry)
            known.add(email.lower())
            added.append(entry)

        return added, skipped

    try:
        return update_keys(path, change)
    except KeysFileError as error:
        raise click.ClickException(f"{error}; fix it before adding keys") from error


def set_disabled(path, email, disabled):
    """Disable or enable every key of `email`; return how many entries changed."""

    def change(entries):
        matching = [e for e in entries if e["email"].lower() == email.lower()]
        for entry in matching:
            if disabled:
                entry["disabled"] = True
            else:
                entry.pop("disabled", None)

        return len(matching)

    try:
        changed = update_keys(path, change)
    except KeysFileError as error:
        raise click.ClickException(f"{error}; fix it first") from error

    if not changed:
        raise click.ClickException(f"no key in keys.json belongs to {email}")

    return changed


def read_roster(file):
    """Return (name, email) pairs from a CSV with `name,email` columns."""
    reader = csv.DictReader(file)
    if not reader.fieldnames or not {"name", "email"} <= set(reader.fieldnames):
        raise click.ClickException(f"{file.name} needs a header row: name,email")

    people = []
    for row in reader:
        name, email = (row["name"] or "").strip(), (row["email"] or "").strip()
        _check_person(name, email, where=f"{file.name} line {reader.line_num}: ")
        people.append((name, email))

    return people


def _check_person(name, email, where=""):
    if not name:
        raise click.ClickException(f"{where}the name is empty; nothing was added")

    if not is_valid_email(email):
        raise click.ClickException(
            f"{where}{email!r} is not an e-mail address; nothing was added"
        )


@click.command()
@click.argument("name", required=False)
@click.argument("email", required=False)
@click.option(
    "--csv",
    "roster",
    type=click.File(encoding="utf-8-sig"),
    help="Add everyone in a CSV file with name,email columns.",
)
@click.option("--daily-budget", type=click.IntRange(min=0), help="Tokens per day.")
@click.option("--total-budget", type=click.IntRange(min=0), help="Tokens in total.")
@click.option("--expires", metavar="YYYY-MM-DD", help="Last day the key works.")
@click.option(
    "--teacher",
    is_flag=True,
    help="Make a teacher key: it also sees the whole class on the usage page.",
)
@click.option("--disable", "to_disable", metavar="EMAIL", help="Switch a student off.")
@click.option(
    "--enable", "to_enable", metavar="EMAIL", help="Switch a student on again."
)
def main(
    name,
    email,
    roster,
    daily_budget,
    total_budget,
    expires,
    teacher,
    to_disable,
    to_enable,
):
    """Make a key for a student and add it to keys.json.

    NAME and EMAIL are both required, unless --csv gives a whole class.
    Budgets and --expires override config.json's defaults for the new keys.
    The proxy picks up every change on its next request; no restart needed.
    """
    if to_disable or to_enable:
        _switch(to_disable, to_enable, name or email or roster)
        return

    if expires is not None and not is_day(expires):
        raise click.BadParameter(
            f"{expires!r} is not a YYYY-MM-DD date", param_hint="--expires"
        )

    if roster is None and not (name and email):
        raise click.UsageError("give a NAME and an EMAIL, or --csv FILE")

    if roster is not None and (name or email):
        raise click.UsageError("give either NAME EMAIL or --csv FILE, not both")

    if roster is None:
        _check_person(name.strip(), email.strip())
        people = [(name.strip(), email.strip())]
    else:
        people = read_roster(roster)

    extra = {
        field: value
        for field, value in (
            ("daily_token_budget", daily_budget),
            ("total_token_budget", total_budget),
            ("expires", expires),
            ("role", "admin" if teacher else None),
        )
        if value is not None
    }
    added, skipped = add_students(get_keys_path(), people, extra)
    if roster is None:
        _echo_single(added, email)
    else:
        _echo_roster(added, skipped)


def _switch(to_disable, to_enable, other):
    if (to_disable and to_enable) or other:
        raise click.UsageError("--disable and --enable take one EMAIL and nothing else")

    email = to_disable or to_enable
    changed = set_disabled(get_keys_path(), email, disabled=bool(to_disable))
    state = "disabled" if to_disable else "enabled"
    click.echo(f"{state} {email} ({changed} key{'s' if changed > 1 else ''})")


def _echo_single(added, email):
    if not added:
        raise click.ClickException(f"{email} already has a key in keys.json")

    click.echo(json.dumps(added[0], indent=2, ensure_ascii=False))


def _echo_roster(added, skipped):
    if added:
        # Built in memory: click.get_text_stream is deprecated in click 8.5.
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["name", "email", "key"])
        for entry in added:
            writer.writerow([entry["name"], entry["email"], entry["key"]])

        click.echo(table.getvalue(), nl=False)

    click.echo(f"added {len(added)}, skipped {len(skipped)} already present", err=True)


if __name__ == "__main__":
    main()
