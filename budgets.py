"""Token budgets: how much of each student's daily and total budget is left.

The limits come from config.json (DAILY_TOKEN_BUDGET, TOTAL_TOKEN_BUDGET)
unless the student's keys.json entry has its own `daily_token_budget` or
`total_token_budget` (null there means unlimited for that student). Usage
comes from db.read_token_totals: two rows, however long usage.sqlite is.

A request is admitted while the recorded usage is under the budget, so a
burst of concurrent requests overshoots by at most what those already in
flight use: a request's tokens are known only when its answer ends.
"""

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import db
from errors import QuotaExceeded


def get_budget_status(student, usage_db, settings, now=None):
    """Return a student's daily and total budget: limit, used, remaining, resets_at.

    `student` is a keys.Student, `settings` a mapping with the budget
    settings (app.config). limit and remaining are None when unlimited;
    resets_at is the next midnight in BUDGET_TIMEZONE, ISO 8601 with offset.
    """
    zone = ZoneInfo(settings["BUDGET_TIMEZONE"])
    today = (now or datetime.now(zone)).astimezone(zone).date()
    used_today, used_total = db.read_token_totals(
        usage_db, student.fingerprint, today.isoformat()
    )
    resets_at = datetime.combine(today + timedelta(days=1), time(), tzinfo=zone)
    return {
        "daily": {
            **_describe(get_limit(student, settings, "daily"), used_today),
            "resets_at": resets_at.isoformat(),
        },
        "total": _describe(get_limit(student, settings, "total"), used_total),
    }


def get_limit(student, settings, period):
    """Return the student's "daily" or "total" token budget, or None."""
    field = f"{period}_token_budget"
    if field in student.entry:
        return student.entry[field]

    return settings[f"{period.upper()}_TOKEN_BUDGET"]


def check_budget(student, usage_db, settings):
    """Raise QuotaExceeded if the student has used up a budget."""
    if all(get_limit(student, settings, p) is None for p in ("daily", "total")):
        return

    status = get_budget_status(student, usage_db, settings)
    daily, total = status["daily"], status["total"]
    if total["remaining"] == 0:
        raise QuotaExceeded(
            f"You have used your total budget of {total['limit']:,} tokens for "
            f"this course ({total['used']:,} used); it does not reset. Nothing was "
            "sent to OpenAI. Ask your teacher if you need more."
        )

    if daily["remaining"] == 0:
        raise QuotaExceeded(
            f"You have used today's budget of {daily['limit']:,} tokens "
            f"({daily['used']:,} used). It resets at {daily['resets_at']} "
            f"(midnight, {settings['BUDGET_TIMEZONE']}). Nothing was sent to "
            "OpenAI; try again after that."
        )


def _describe(limit, used):
    if limit is None:
        return {"limit": None, "used": used, "remaining": None}

    return {"limit": limit, "used": used, "remaining": max(0, limit - used)}
