"""reports.py and periods.py as plain Python."""

import io
from datetime import date

from periods import get_zone, list_day_ranges
from reports import write_class_csv


def test_a_daylight_saving_day_has_its_own_length():
    paris = get_zone("Europe/Paris")

    [(day, start, stop)] = list_day_ranges(date(2025, 3, 30), date(2025, 3, 30), paris)

    assert day == "2025-03-30"
    assert (start, stop) == ("2025-03-29T23:00:00.000Z", "2025-03-30T22:00:00.000Z")


def test_class_csv_does_not_let_a_name_become_a_formula():
    budget = {"daily": {"remaining": None}, "total": {"remaining": 40}}
    person = {
        "name": '=HYPERLINK("http://x")',
        "email": "a@school.test",
        "requests": 1,
        "tokens_today": 2,
        "total_tokens": 3,
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "budget": budget,
        "last_seen": None,
    }
    buffer = io.StringIO()

    write_class_csv([person], buffer)

    line = buffer.getvalue().splitlines()[1]
    assert line == '"\'=HYPERLINK(""http://x"")",a@school.test,1,2,3,1,2,,40,'
