"""Usage figures from usage.sqlite, per student and per model.

Rows name the student by key fingerprint; keys.json turns that into the
name and e-mail the teacher knows, and rows whose key is no longer in
keys.json fall back to the name and e-mail stored with them.
"""

import db

TOTALS_BY_KEY = (
    "SELECT api_key, MAX(email), MAX(name), COUNT(*), SUM(prompt_tokens),"
    " SUM(completion_tokens), SUM(total_tokens) FROM usage_log GROUP BY api_key"
)
TOTALS_BY_MODEL = (
    "SELECT COALESCE(model, '(none)'), COUNT(*), SUM(prompt_tokens),"
    " SUM(completion_tokens), SUM(total_tokens) FROM usage_log"
    " WHERE api_key IN ({keys}) GROUP BY 1 ORDER BY 5 DESC"
)
FIGURES = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")


def open_store(path):
    """Open usage.sqlite for reading, migrating a Node-era file first."""
    db.init_db(path)
    return db.connect(path)


def summarize_students(connection, students):
    """Return one dict per person with usage, largest total first.

    `students` are the keys.Student entries in force, listed even with no
    usage; a student with more than one key (a key replaced) is one person,
    joined by e-mail.
    """
    by_fingerprint = {student.fingerprint: student for student in students}
    people = {
        student.email.lower(): empty_person(student.name, student.email)
        for student in students
    }
    for fingerprint, email, name, *figures in connection.execute(TOTALS_BY_KEY):
        student = by_fingerprint.get(fingerprint)
        if student is not None:
            name, email = student.name, student.email

        email = email or f"(unknown key {fingerprint[7:15]})"
        person = people.setdefault(email.lower(), empty_person(name or "?", email))
        person["keys"].append(fingerprint)
        for figure, value in zip(FIGURES, figures):
            person[figure] += value or 0

    return sorted(people.values(), key=lambda p: p["total_tokens"], reverse=True)


def summarize_models(connection, fingerprints):
    """Return per-model usage for the given key fingerprints."""
    placeholders = ", ".join("?" for _ in fingerprints)
    query = TOTALS_BY_MODEL.format(keys=placeholders)
    return [
        {"model": model, **dict(zip(FIGURES, (n, *(v or 0 for v in sums))))}
        for model, n, *sums in connection.execute(query, list(fingerprints))
    ]


def empty_person(name, email):
    """Return a person's figures before any usage is added."""
    return {"name": name, "email": email, "keys": [], **dict.fromkeys(FIGURES, 0)}

