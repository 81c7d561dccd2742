"""``wsiflow audit``: verify or show the site's hash-chained audit log."""

from __future__ import annotations

import argparse
import json

from privacy import audit_log_path, read_audit_log, verify_audit_log

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK

__all__ = ["add_audit_parser", "run_audit"]


def add_audit_parser(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify or show the site's audit log",
        description=(
            "Every run, view, review save, export, de-identification and model change is appended to "
            "the site's audit log (<site dir>/audit.jsonl): who, what, which pseudonymous slide, which "
            "model and parameter digests, outcome, when. Lines are chained with an HMAC keyed by the "
            "site secret, so editing, removing or reordering any line is detected by 'verify'."
        ),
    )
    sub = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    verify = sub.add_parser("verify", help="check the chain; exit 1 naming each broken line")
    verify.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="print the last events")
    show.add_argument("-n", type=int, default=20, metavar="N", help="how many (default 20; 0 = all)")
    show.add_argument("--json", action="store_true")


def run_audit(args: argparse.Namespace, config: WsiflowConfig) -> int:
    if args.audit_action == "verify":
        result = verify_audit_log()
        if args.json:
            print(json.dumps({"ok": result.ok, "lines": result.lines, "problems": list(result.problems)}, indent=2))
        elif result.ok:
            print(f"audit log ok: {result.lines} event(s), chain intact ({audit_log_path()})")
        else:
            print(f"audit log BROKEN: {len(result.problems)} problem(s) in {result.lines} line(s)")
            for problem in result.problems:
                print(f"  {problem}")
        return EXIT_OK if result.ok else EXIT_FAILED
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
