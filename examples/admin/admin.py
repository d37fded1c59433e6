#!/usr/bin/env python3
"""Hearth admin API from Python 3 (standard library only).

    HEARTH_ADMIN_URL=http://127.0.0.1:9465 HEARTH_ADMIN_TOKEN=... python3 admin.py [document]

Optional: EVENT=name fires that custom event first; STREAM_COUNT=n (default 50).
"""
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

BASE = os.environ.get("HEARTH_ADMIN_URL", "http://127.0.0.1:9465")
TOKEN = os.environ.get("HEARTH_ADMIN_TOKEN")
NAME = sys.argv[1] if len(sys.argv) > 1 else "example-doc"
COUNT = int(os.environ.get("STREAM_COUNT", "50"))

# Document names go into the path percent-encoded ("notes/2024" -> "notes%2F2024").
DOC = "/v1/documents/" + urllib.parse.quote(NAME, safe="")


def fail(message):
    sys.exit(f"error: {message}")  # one line on stderr, exit status 1


def call(method, path, body=None):
    """One request; any non-2xx answer ends the script with the error code from the body."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
    })
    try:
        with urllib.request.urlopen(req, timeout=70) as res:
            return json.load(res)
    except urllib.error.HTTPError as e:
        try:
            err = json.load(e)["error"]
        except (ValueError, KeyError, TypeError):
            err = {"code": "?", "message": e.reason}
        fail(f"{method} {path}: {e.code} {err['code']}: {err['message']}")
    except urllib.error.URLError as e:
        fail(f"{method} {path}: {e.reason}")


if not TOKEN:
    fail("HEARTH_ADMIN_TOKEN is not set")

# (a) Fire a custom event on the document's owner, if EVENT names one.
if os.environ.get("EVENT"):
    event = urllib.parse.quote(os.environ["EVENT"], safe="")
    answer = call("POST", f"{DOC}/events/{event}", {"payload": {"from": "admin.py"}})
    if "reply" in answer:
        print("event reply:", json.dumps(answer["reply"]))
    else:
        print("event reply: (base64)", answer["reply_base64"])

# (b) Stream text into root type "content", one small append per request, the way an assistant
# writes. Each answer comes once the edit is committed; open editors see the words arrive.
words = "Hearth commits every edit before it answers, so each word below is already saved.".split()
for i in range(COUNT):
    call("POST", f"{DOC}/ops", {
        "ops": [{"op": "text.insert", "type": "content", "text": words[i % len(words)] + " "}],
    })

# Tell the document's clients, on every node, with a stateless message.
call("POST", f"{DOC}/broadcast", {"message": json.dumps({"kind": "assistant-done"})})

# (c) Read it back as JSON, reading root "content" as text.
doc = call("GET", f"{DOC}?include=json&types=content:text")
print(json.dumps(doc["json"], indent=2))
