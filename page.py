"""The usage page (static/index.html) and the JSON endpoints it reads.

`authenticate` in app.py has already checked the key of every /api/ request
and put its owner in `g.student`; these views only decide what that key
may see: a student their own usage, a teacher (admin) the whole class.
"""

import io

from flask import Response, current_app, g, jsonify, request

import db
from budgets import get_budget_status
from controls import is_expired
from errors import BadRequest, Forbidden
from keys import is_admin
from periods import get_zone
from reports import build_class_report, build_student_report, write_class_csv

# The page is self-contained: nothing may load from elsewhere, nothing inline.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


def register_page(app):
    """Add the page's routes to the app."""
    app.add_url_rule("/", view_func=show_page)
    app.add_url_rule("/usage", view_func=show_page)
    app.add_url_rule("/api/usage", view_func=get_own_usage)
    app.add_url_rule("/api/class", view_func=get_class_usage)
    app.add_url_rule("/api/class.csv", view_func=get_class_csv)


def show_page():
    """Serve the usage page; it asks for the key itself."""
    response = current_app.send_static_file("index.html")
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    return response


def get_own_usage():
    """Return the caller's own usage, budget and recent requests."""
    report = build_student_report(
        _connect(), _list_students(), g.student, _read_zone(), _get_budget
    )
    report["expires"] = g.student.entry.get("expires")
    report["expired"] = is_expired(g.student, current_app.config["BUDGET_TIMEZONE"])
    return _private(jsonify(report))


def get_class_usage():
    """Return every student's usage, for a teacher key only."""
    return _private(jsonify(_build_class_report()))


def get_class_csv():
    """Return the class table as a CSV download, for a teacher key only."""
    buffer = io.StringIO()
    write_class_csv(_build_class_report()["students"], buffer)
    response = Response(buffer.getvalue(), mimetype="text/csv")
    response.headers["Content-Disposition"] = 'attachment; filename="class-usage.csv"'
    return _private(response)


def _build_class_report():
    if not is_admin(g.student):
        raise Forbidden(
            "Only a teacher key can see the whole class. Your own usage is at "
            "/api/usage.",
            code="admin_only",
        )

    return build_class_report(_connect(), _list_students(), _read_zone(), _get_budget)


def _get_budget(student):
    return get_budget_status(
        student, current_app.config["USAGE_DB"], current_app.config
    )


def _connect():
    return db.get_db(current_app.config["USAGE_DB"])


def _list_students():
    return current_app.extensions["keyring"].students()


def _read_zone():
    try:
        return get_zone(request.args.get("tz") or "UTC")
    except ValueError as error:
        raise BadRequest(str(error), param="tz") from error


def _private(response):
    # Usage is personal: no shared cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    return response
