"""forward.py and config.normalize_base_url as plain Python."""

import pytest

from config import ConfigError, normalize_base_url
from forward import build_upstream_headers, build_upstream_url


def test_student_key_and_billing_headers_are_not_forwarded():
    client_headers = {
        "Authorization": "Bearer sk-student",
        "api-key": "sk-student",
        "OpenAI-Organization": "org-student-picked",
        "OpenAI-Project": "proj-student-picked",
        "X-Stainless-Lang": "python",
    }

    sent = build_upstream_headers(client_headers, "sk-teacher")

    assert sent["Authorization"] == "Bearer sk-teacher"
    assert "sk-student" not in str(sent)
    assert not {"OpenAI-Organization", "OpenAI-Project"} & set(sent)
    assert sent["X-Stainless-Lang"] == "python"


def test_headers_named_in_connection_are_hop_by_hop():
    client_headers = {"Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-Kept": "2"}

    sent = build_upstream_headers(client_headers, "sk-teacher")

    assert "X-Hop" not in sent and "Connection" not in sent
    assert sent["X-Kept"] == "2"


@pytest.mark.parametrize(
    "written, used",
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("https://api.openai.com/v1/", "https://api.openai.com/v1"),
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434/v1"),
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434/v1"),
        ("https://example.test/v1beta/openai/", "https://example.test/v1beta/openai"),
    ],
)
def test_base_url_is_taken_as_the_sdk_takes_it(written, used):
    assert normalize_base_url(written) == used


@pytest.mark.parametrize("written", ["api.openai.com/v1", "ftp://x/v1", "http://"])
def test_base_url_without_http_scheme_and_host_is_refused(written):
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        normalize_base_url(written)


def test_a_key_put_in_the_query_string_is_not_forwarded():
    url = build_upstream_url(
        "https://api.example/v1", "files", b"api_key=sk-student&limit=5&key=sk-x"
    )

    assert url == "https://api.example/v1/files?limit=5"
