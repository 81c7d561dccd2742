"""``wsiflow audit``: verify, show or rotate the site's hash-chained audit log."""

from __future__ import annotations

import argparse
import json

from privacy import audit_log_path, read_audit_log, rotate_audit_log, verify_audit_log

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK

__all__ = ["add_audit_parser", "run_audit"]


def add_audit_parser(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify, show or rotate the site's audit log",
        description=(
            "Every run, view, review save, export, de-identification and model change is appended to "
            "the site's audit log (<site dir>/audit.jsonl): who, what, which pseudonymous slide, which "
            "model and parameter digests, outcome, when. Lines are chained with an HMAC keyed by the "
            "site secret, and an authenticated head and anchor record where the log ends and which log "
            "the site keeps, so 'verify' detects any edited, removed, reordered or cut-off line and a "
            "deleted log or head. An audited command refuses to append to a damaged log; 'rotate' starts "
            "a new log on purpose, keeping the old one beside it."
        ),
    )
    sub = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    verify = sub.add_parser("verify", help="check the chain, head and anchor; exit 1 naming each problem")
    verify.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="print the last events")
    show.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20; 0 = all)")
    show.add_argument("--json", action="store_true")
    rotate = sub.add_parser(
        "rotate",
        help="start a new log after an incident (the old log is kept; the rotation is audited)",
        description=(
            "Move the current log and head aside as audit-<UTC time>-<log id>.jsonl[.head] in the site dir "
            "and start a new log whose first event (audit-rotate) records the reason and the old log's "
            "state: its ID, events, last sequence and how far it verified. Use it after an incident has "
            "been investigated, or to archive a long log. The reason is kept in clear: no paths, file "
            "names or patient data."
        ),
    )
    rotate.add_argument("--reason", required=True, help="why the log is rotated (kept in clear in the log)")
    rotate.add_argument("--json", action="store_true")


def run_audit(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if args.audit_action == "verify":
        return _verify(args.json)
    if args.audit_action == "rotate":
        return _rotate(args.reason, args.json)
    events = read_audit_log()
    events = events[-args.n:] if args.n > 0 else events
    if args.json:
        print(json.dumps(events, indent=2))
    else:
        for e in events:
            model = (e.get("model_digest") or "")[:12]
            print(f"{e['seq']:>6} {e['time']} {e['actor']:<12} {e['action']:<13} {e.get('slide_id') or '-':<22} "
                  f"{model or '-':<12} {e['outcome']}")
    return EXIT_OK


def _verify(as_json: bool) -> int:
    result = verify_audit_log()
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    elif not result.ok:
        print(f"audit log BROKEN: {len(result.problems)} problem(s) in {result.lines} line(s)")
        for problem in result.problems:
            print(f"  {problem}")
    elif result.log_id is None:
        print(f"no audit log yet: nothing has been audited on this site ({audit_log_path()})")
    else:
        print(f"audit log ok: {result.lines} event(s), chain intact, head and anchor match "
              f"(log {result.log_id}, since {result.since}; {audit_log_path()})")
    return EXIT_OK if result.ok else EXIT_FAILED


def _rotate(reason: str, as_json: bool) -> int:
    rotation = rotate_audit_log(reason)
    if as_json:
        print(json.dumps({"previous": rotation.previous.to_json(), "previous_state": rotation.previous_state,
                          "kept_as": list(rotation.kept_as), "log_id": rotation.log_id,
                          "record": rotation.record.to_json()}, indent=2))
        return EXIT_OK
    kept = ", ".join(rotation.kept_as) or "nothing to keep"
    print(f"audit log rotated: the previous log ({rotation.previous_state}, {rotation.previous.lines} event(s), "
          f"verified to sequence {rotation.previous.verified_to}) kept as {kept} in the site dir; "
          f"new log {rotation.log_id} starts with the audit-rotate event")
    for problem in rotation.previous.problems:
        print(f"  previous log: {problem}")
    return EXIT_OK
