"""Report usage: `python usage.py` for the class, `python usage.py EMAIL` for one."""

import os

import click

from config import ConfigError, get_data_path, load_settings
from keys import KeysFileError, index_students, parse_keys
from reports import open_store, summarize_models, summarize_students

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
    return f"{value:,}" if isinstance(value, int) else str(value)


@click.command()
@click.argument("email", required=False)
def main(email):
    """Print token usage per student, or one student's usage by model."""
    connection, students = load_data()
    people = summarize_students(connection, students)
    if email is None:
        click.echo(format_table(people, COLUMNS) if people else "no usage recorded yet")
        return

    person = _find_person(people, email)
    click.echo(f"{person['name']} <{person['email']}>")
    click.echo(format_table([person], COLUMNS[2:]))
    models = summarize_models(connection, person["keys"])
    if models:
        click.echo()
        click.echo(format_table(models, (("model", "Model"), *COLUMNS[2:])))


def _find_person(people, email):
    wanted = email.strip().lower()
    for person in people:
        if person["email"].lower() == wanted:
            return person

    raise click.ClickException(f"no student with e-mail {email} in keys.json or usage")


if __name__ == "__main__":
    main()
