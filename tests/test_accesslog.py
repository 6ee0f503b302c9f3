"""access.log: redaction, escaping, no secrets, rotation across workers."""

import base64
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import UPSTREAM_KEY, add_student

from accesslog import KEPT_PREFIX, describe_json_body

IMAGE_BASE64 = base64.b64encode(bytes(range(256)) * 40).decode()
AUDIO_BASE64 = base64.b64encode(b"RIFF" + bytes(8000)).decode()
# One access line: the fields always in this order, client text as JSON strings.
JSON_STRING = r'"(?:[^"\\]|\\.)*"'
LINE_PATTERN = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    rf" user=(?P<user>{JSON_STRING})"
    rf" client={JSON_STRING}"
    rf" method=(?P<method>{JSON_STRING})"
    rf" path=(?P<path>{JSON_STRING})"
    r" status=(?P<status>\d{3})"
    r" ms=\d+"
    rf" model=(?P<model>{JSON_STRING})"
    r" tokens=(?:\d+|\?)/(?:\d+|\?)/(?:\d+|\?)"
    r" partial=(?:yes|no)"
    r" body=(?P<body>.*)$"
)
ROTATION_REQUESTS = 250
ROTATION_THREADS = 8


def parse_lines(text):
    """Return each access line's fields; fail on a line that is not one."""
    entries = []
    for line in text.splitlines():
        match = LINE_PATTERN.match(line)
        assert match, f"malformed access line: {line!r}"
        fields = match.groupdict()
        for name in ("user", "method", "path", "model"):
            fields[name] = json.loads(fields[name])

        entries.append(fields)

    return entries


def wait_for_lines(proxy, count, seconds=10):
    """Return the access lines once there are at least `count`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        entries = parse_lines(proxy.access_log())
        if len(entries) >= count:
            return entries

        time.sleep(0.02)

    return parse_lines(proxy.access_log())


def find_lines(proxy, text, count=1):
    """Return the access lines mentioning `text`, waiting for `count` of them."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in proxy.access_log().splitlines() if text in line]
        if len(lines) >= count:
            break

        time.sleep(0.02)

    time.sleep(0.1)
    return [line for line in proxy.access_log().splitlines() if text in line]


def send_raw(proxy, request_bytes):
    """Send bytes as they are and return the status line of the answer."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request_bytes)
        return connection.makefile("rb").readline().decode()


# Redaction, as plain Python.


def test_image_data_urls_in_chat_messages_are_cut_to_a_prefix():
    url = f"data:image/png;base64,{IMAGE_BASE64}"
    payload = {
        "model": "gpt-4o",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }

    text = describe_json_body(payload)

    assert IMAGE_BASE64[100:140] not in text
    assert url[:KEPT_PREFIX] in text
    assert "What is in this picture?" in text
    assert len(text) < 400


def test_input_audio_data_is_cut_to_a_prefix():
    payload = {
        "model": "gpt-4o-audio-preview",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": AUDIO_BASE64, "format": "wav"},
                    }
                ],
            }
        ],
    }

    text = describe_json_body(payload)

    assert AUDIO_BASE64[200:240] not in text
    assert AUDIO_BASE64[:KEPT_PREFIX] in text
    assert '"format":"wav"' in text


def test_long_base64_strings_anywhere_are_cut_to_a_prefix():
    wrapped = "\n".join(IMAGE_BASE64[i : i + 76] for i in range(0, 2000, 76))
    pdf = f"data:application/pdf;base64,{IMAGE_BASE64}"
    payload = {
        "input": [{"type": "input_file", "file_data": pdf}],
        "b64_json": IMAGE_BASE64,
        "mime_wrapped": wrapped,
        "urlsafe": base64.urlsafe_b64encode(bytes(range(256)) * 4).decode(),
    }

    text = describe_json_body(payload)

    assert len(text) < 600
    assert IMAGE_BASE64[300:340] not in text


def test_ordinary_text_is_logged_as_it_is():
    prose = "Explain, in three short paragraphs, why the sky is blue. " * 8

    text = describe_json_body({"model": "gpt-4o-mini", "input": prose})

    assert json.loads(text)["input"] == prose


def test_a_long_prompt_without_punctuation_is_not_taken_for_base64():
    prose = "write me a story about a dragon who lives in a castle and eats cake " * 5

    text = describe_json_body({"messages": [{"role": "user", "content": prose}]})

    assert json.loads(text)["messages"][0]["content"] == prose


# Through gunicorn.


def test_image_payload_is_redacted_in_the_access_log(proxy, upstream, student):
    url = f"data:image/jpeg;base64,{IMAGE_BASE64}"
    content = [{"type": "image_url", "image_url": {"url": url}}]

    requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {student.key}"},
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": content}]},
        timeout=10,
    )

    [line] = find_lines(proxy, student.email)
    assert IMAGE_BASE64[100:140] not in line
    assert url[:KEPT_PREFIX] in line
    assert len(line) < 1000


def test_newlines_and_quotes_in_the_model_name_cannot_forge_a_line(
    proxy, upstream, student
):
    model = 'gpt-4o"\n2099-01-01T00:00:00Z user="Forged <f@x>" status=200\r\nx'

    requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {student.key}"},
        json={"model": model, "messages": [{"role": "user", "content": 'a"\nb'}]},
        timeout=10,
    )

    [line] = find_lines(proxy, student.email)
    [entry] = parse_lines(line)
    assert entry["model"] == model
    assert "2099-01-01" not in "".join(
        other[:10] for other in proxy.access_log().splitlines()
    )


def test_newlines_and_quotes_in_the_path_cannot_forge_a_line(proxy, upstream, student):
    forged = "%22%0a2099-01-01T00:00:00Z%20user=%22Forged%22%0d%0a"

    status = send_raw(
        proxy,
        (
            f"GET /v1/models/{forged}x HTTP/1.1\r\nHost: proxy\r\n"
            f"Authorization: Bearer {student.key}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )

    assert status.startswith("HTTP/1.1 ")
    [line] = find_lines(proxy, student.email)
    [entry] = parse_lines(line)
    assert entry["path"].startswith('/v1/models/"\n2099')
    assert not any(
        other.startswith("2099") for other in proxy.access_log().splitlines()
    )


def test_keys_never_reach_the_access_log_or_the_server_log(proxy, upstream, student):
    unknown = "sk-unknown-but-secret-0123456789"
    headers = [
        {"Authorization": f"Bearer {student.key}"},
        {"api-key": student.key},
        {"x-api-key": student.key},
        {"Authorization": f"Bearer {unknown}"},
        {"api-key": unknown},
        {"x-api-key": unknown},
    ]
    forced = [{}, {"x-fake-status": "500"}, {"x-fake-status": "401"}]

    for header in headers:
        for extra in forced:
            requests.post(
                f"{proxy.url}/v1/chat/completions",
                headers={**header, **extra},
                json={"model": "gpt-4o-mini", "messages": []},
                timeout=10,
            )
            requests.get(f"{proxy.url}/v1/models", headers=header, timeout=10)

    find_lines(proxy, student.email, count=len(forced) * 2 * 3)
    logs = proxy.access_log() + proxy.log()
    for secret in (student.key, unknown, UPSTREAM_KEY):
        assert secret not in logs
        assert secret[-12:] not in logs


def test_missing_and_unknown_keys_are_logged_as_such(proxy, upstream):
    marker = f"/v1/models/marker-{time.monotonic_ns()}"

    requests.get(f"{proxy.url}{marker}", timeout=10)
    requests.get(
        f"{proxy.url}{marker}",
        headers={"Authorization": "Bearer sk-nobody"},
        timeout=10,
    )

    lines = find_lines(proxy, marker, count=2)
    users = sorted(entry["user"] for entry in parse_lines("\n".join(lines)))
    assert users == ["(no key)", "(unknown key)"]
    assert all(entry["status"] == "401" for entry in parse_lines("\n".join(lines)))


def test_rotation_across_workers_loses_and_interleaves_no_line(proxy_factory, upstream):
    running = proxy_factory(ACCESS_LOG_MAX_MB=0.02, ACCESS_LOG_BACKUPS=5)
    student = add_student(running.keys_path)
    messages = [{"role": "user", "content": "lorem ipsum, dolor sit amet. " * 4}]

    def ask(number):
        return requests.post(
            f"{running.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {student.key}"},
            json={"model": f"m-{number}", "messages": messages},
            timeout=30,
        ).status_code

    with ThreadPoolExecutor(ROTATION_THREADS) as pool:
        statuses = list(pool.map(ask, range(ROTATION_REQUESTS)))

    assert statuses == [200] * ROTATION_REQUESTS
    files = _wait_for_rotated_lines(running, ROTATION_REQUESTS)
    assert len(files) > 2, "the log did not rotate"
    assert len(files) <= 6, "more requests than 5 backups hold: lower the count"
    entries = parse_lines("".join(path.read_text() for path in files))
    models = sorted(entry["model"] for entry in entries if entry["path"] != "/health")
    assert models == sorted(f"m-{number}" for number in range(ROTATION_REQUESTS))


def _wait_for_rotated_lines(running, count):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        files = sorted(running.data_dir.glob("access.log*"))
        files = [path for path in files if not path.name.endswith(".lock")]
        lines = sum(len(path.read_text().splitlines()) for path in files)
        if lines >= count:
            break

        time.sleep(0.05)

    time.sleep(0.2)
    return [
        path
        for path in sorted(running.data_dir.glob("access.log*"))
        if not path.name.endswith(".lock")
    ]


def forwarded_for(student, address):
    return {"Authorization": f"Bearer {student.key}", "X-Forwarded-For": address}


def test_x_forwarded_for_is_ignored_unless_configured(proxy, upstream, student):
    requests.get(
        f"{proxy.url}/v1/models",
        headers=forwarded_for(student, "6.6.6.6"),
        timeout=10,
    )

    [line] = find_lines(proxy, student.email)
    assert 'client="127.0.0.1"' in line


def test_x_forwarded_for_names_the_client_behind_a_trusted_proxy(
    proxy_factory, upstream
):
    running = proxy_factory(TRUSTED_PROXIES=1)
    student = add_student(running.keys_path)

    requests.get(
        f"{running.url}/v1/models",
        headers=forwarded_for(student, "6.6.6.6"),
        timeout=10,
    )

    [line] = find_lines(running, student.email)
    assert 'client="6.6.6.6"' in line
