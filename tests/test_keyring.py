"""KeyRing reloads seen from several threads at once."""

import json
import threading

import keys
from keys import KeyRing


def test_thread_arriving_during_a_reload_finds_the_new_key(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    ring = KeyRing(str(path))
    ring.load()
    path.write_text(json.dumps([{"key": "sk-new", "name": "A", "email": "a@b.c"}]))
    parsing, release = threading.Event(), threading.Event()
    real_parse = keys.parse_keys

    def slow_parse(text, source="keys.json"):
        parsing.set()
        release.wait(10)
        return real_parse(text, source)

    monkeypatch.setattr(keys, "parse_keys", slow_parse)
    found = []

    def refresh_and_find():
        ring.refresh()
        found.append(ring.find("sk-new"))

    first = threading.Thread(target=ring.refresh)
    first.start()
    parsing.wait(10)
    second = threading.Thread(target=refresh_and_find)
    second.start()
    second.join(0.2)
    release.set()
    first.join(10)
    second.join(10)

    assert found[0] is not None
