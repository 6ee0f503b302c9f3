"""Migrations of usage.sqlite files written by the Node proxy."""

import sqlite3

import db
from keys import fingerprint

NODE_SCHEMA = (
    "CREATE TABLE usage_log (id INTEGER PRIMARY KEY AUTOINCREMENT, api_key TEXT,"
    " date TEXT DEFAULT CURRENT_TIMESTAMP, model TEXT, endpoint TEXT,"
    " prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER)"
)


def test_node_rows_dated_by_sqlite_become_iso_utc(tmp_path):
    path = str(tmp_path / "usage.sqlite")
    with sqlite3.connect(path) as node:
        node.execute(NODE_SCHEMA)
        node.execute(
            "INSERT INTO usage_log (api_key, date, model, endpoint, total_tokens)"
            " VALUES ('sk-old', '2025-03-02 11:00:00', 'gpt-4o', '/v1/chat', 7),"
            " ('sk-old', '2025-03-03T08:00:00.123Z', 'gpt-4o', '/v1/chat', 5)"
        )
    node.close()

    db.init_db(path)

    with sqlite3.connect(path) as migrated:
        rows = migrated.execute("SELECT api_key, date FROM usage_log").fetchall()
    migrated.close()
    assert rows == [
        (fingerprint("sk-old"), "2025-03-02T11:00:00.000Z"),
        (fingerprint("sk-old"), "2025-03-03T08:00:00.123Z"),
    ]
