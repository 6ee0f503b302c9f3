"""Running token totals and budget status, as plain Python on a real SQLite file."""

import json
import sqlite3
from datetime import UTC, datetime

import pytest

import db
from budgets import get_budget_status
from config import DEFAULTS, ConfigError
from controls import check_settings
from keys import KeysFileError, Student, parse_keys

SETTINGS = {
    "DAILY_TOKEN_BUDGET": 100,
    "TOTAL_TOKEN_BUDGET": None,
    "BUDGET_TIMEZONE": "UTC",
}


def make_row(key, date, tokens):
    return db.UsageRow(
        api_key=key,
        date=date,
        model="m",
        endpoint="/v1/chat/completions",
        prompt_tokens=None,
        completion_tokens=None,
        total_tokens=tokens,
        email="a@b.c",
        name="A",
        method="POST",
        status=200,
        duration_ms=1,
        streamed=True,
        partial=tokens is None,
    )


def make_student(**entry):
    return Student("A", "a@b.c", "sha256:aa", entry=entry)


def test_totals_are_backfilled_from_rows_written_before_the_migration(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    connection = sqlite3.connect(path)
    db._create_node_table(connection)
    connection.executemany(
        "INSERT INTO usage_log (api_key, date, total_tokens) VALUES (?, ?, ?)",
        [
            ("sha256:aa", "2024-05-01T23:30:00.000Z", 10),
            ("sha256:aa", "2024-05-02T00:30:00.000Z", 5),
            ("sha256:aa", "2024-05-02T01:00:00.000Z", None),
        ],
    )
    connection.commit()
    connection.close()

    db.init_db(path)

    assert db.read_token_totals(path, "sha256:aa", "2024-05-02") == (5, 15)
    assert db.read_token_totals(path, "sha256:bb", "2024-05-02") == (0, 0)


def test_each_usage_row_adds_to_its_local_day_and_zone_changes_rebuild(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    db.init_db(path)
    db.use_budget_timezone(path, "America/New_York")

    db.record_usage(path, make_row("sha256:aa", "2024-05-02T03:00:00.000Z", 7))
    db.record_usage(path, make_row("sha256:aa", "2024-05-02T05:00:00.000Z", 3))
    db.record_usage(path, make_row("sha256:aa", "2024-05-02T06:00:00.000Z", None))
    in_new_york = db.read_token_totals(path, "sha256:aa", "2024-05-01")
    db.use_budget_timezone(path, "UTC")

    assert in_new_york == (7, 10)
    assert db.read_token_totals(path, "sha256:aa", "2024-05-02") == (10, 10)


def test_budget_status_uses_the_entry_override_and_the_zone_midnight(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    db.init_db(path)
    db.use_budget_timezone(path, "Asia/Tokyo")
    db.record_usage(path, make_row("sha256:aa", "2024-05-01T16:00:00.000Z", 40))
    now = datetime(2024, 5, 1, 20, 0, tzinfo=UTC)
    settings = {**SETTINGS, "BUDGET_TIMEZONE": "Asia/Tokyo", "TOTAL_TOKEN_BUDGET": 30}

    status = get_budget_status(make_student(daily_token_budget=50), path, settings, now)

    assert status == {
        "daily": {
            "limit": 50,
            "used": 40,
            "remaining": 10,
            "resets_at": "2024-05-03T00:00:00+09:00",
        },
        "total": {"limit": 30, "used": 40, "remaining": 0},
    }
    student = make_student(total_token_budget=None)
    unlimited = get_budget_status(student, path, settings, now)
    assert unlimited["total"] == {"limit": None, "used": 40, "remaining": None}


@pytest.mark.parametrize(
    "field",
    [{"expires": "2024-5-1"}, {"daily_token_budget": -1}, {"total_token_budget": "9"}],
)
def test_bad_control_fields_in_keys_json_are_rejected(field):
    entry = {"key": "k", "name": "A", "email": "a@b.c", **field}

    with pytest.raises(KeysFileError):
        parse_keys(json.dumps([entry]))


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"RATE_LIMIT_PER_STUDENT": "0/minute"}, "RATE_LIMIT_PER_STUDENT"),
        (
            {"DEFAULT_MODEL": "gpt-4o", "ALLOWED_MODELS": ["gpt-4o-mini"]},
            "DEFAULT_MODEL",
        ),
    ],
)
def test_settings_that_would_refuse_every_request_are_refused(bad, named):
    settings = {**DEFAULTS, "OPENAI_API_KEY": "sk-x", **bad}

    with pytest.raises(ConfigError, match=named):
        check_settings(settings)
