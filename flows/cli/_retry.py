"""``wsiflow retry``: mark an inbox's failed slides for another try at its next look.

The fix is usually a config change (an ``mpp_overrides`` entry, another backend), so the
command can also rebuild the inbox's stored settings the way ``serve`` built them: from
the config this command reads and the settings options ``serve`` was given, with any
settings options given here on top. It prints what it did by slide ID, never by path.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any

from pipeline import ConfigError, RunSettings

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK
from ._options import add_settings_options, build_run_settings
from ._serve import check_inbox_settings, config_source, given_options, settings_option_names

__all__ = ["add_retry_parser", "run_retry"]


def add_retry_parser(commands: argparse._SubParsersAction) -> None:
    retry = commands.add_parser(
        "retry",
        help="submit an inbox's failed slides again at its next look (after fixing the cause)",
        description=(
            "Mark failed slides in the ledger of inbox ID (printed by `wsiflow serve`) so that the "
            "inbox's next look submits them again. With --reload-config, or any settings option, "
            "the inbox's settings are rebuilt first as serve built them: from the config this "
            "command reads (--config or $WSIFLOW_CONFIG) and serve's settings options, with the "
            "options given here on top; they apply from the next look on. Exit 0: every slide asked "
            "for is marked; 1: some could not be (processed, under analysis or not analysed yet); "
            "2: bad arguments, an unknown inbox or slide ID."
        ),
    )
    retry.add_argument("--inbox-id", required=True, metavar="ID", help="the inbox (i-0123456789)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--slide-id", dest="slide_ids", nargs="+", metavar="S",
                       help="these pseudonymous slide IDs (as the inbox's batch table shows them)")
    which.add_argument("--all-failed", action="store_true", help="every failed slide of the inbox")
    retry.add_argument("--reload-config", action="store_true",
                       help="rebuild the inbox's settings from the config this command reads and serve's options")
    # The inbox keeps its output folder (its ledger points into it): --out is not an option here.
    add_settings_options(retry, with_out=False)


def _rebuilt_settings(inbox_id: str, record: dict[str, Any], given: dict[str, Any],
                      config: WsiflowConfig) -> tuple[RunSettings, dict[str, Any]]:
    """The inbox's settings from ``config`` and serve's options overridden by ``given``."""
    stored = record.get("options")
    if stored is None:
        raise ConfigError(f"inbox {inbox_id} was stored without the options serve was given",
                          hint="serve the same --inbox and --out again (that keeps its ledger), then retry")
    options = {**stored, **given}
    names = settings_option_names()
    namespace = argparse.Namespace(**dict.fromkeys(names))
    for name, value in options.items():
        setattr(namespace, name, tuple(value) if isinstance(value, list) else value)
    return check_inbox_settings(build_run_settings(config, namespace)), options


def _mark(entries: list[dict[str, Any]], running: bool) -> tuple[str, bool]:
    """Mark one slide's ledger entries; what was done and whether it is now due for a retry."""
    statuses = {entry["status"] for entry in entries}
    if "failed" in statuses:
        kinds = sorted({(e.get("error") or {}).get("kind") or "error" for e in entries if e["status"] == "failed"})
        for entry in entries:
            if entry["status"] == "failed":
                entry["status"] = "retry"
        return f"marked for retry at the next look (failed: {', '.join(kinds)})", True
    if "retry" in statuses:
        return "already marked for retry at the next look", True
    if "submitted" in statuses:
        batches = ", ".join(sorted({e.get("batch_id") or "?" for e in entries if e["status"] == "submitted"}))
        if running:
            return f"not marked: under analysis now (batch {batches})", False
        return f"left by a look that stopped (batch {batches}): the next look submits it again", True
    if "processed" in statuses:
        return "not marked: processed, nothing to retry", False
    return "not marked: not analysed yet (its copy is settling)", False


def run_retry(args: argparse.Namespace, config: WsiflowConfig) -> int:
    from .._inbox import check_inbox_id, load_inbox_record, look_running, read_ledger, save_inbox, update_ledger

    inbox_id = check_inbox_id(args.inbox_id)
    record = load_inbox_record(inbox_id)
    known = {entry.get("slide_id") for entry in read_ledger(inbox_id).values()}
    unknown = [s for s in args.slide_ids or [] if s not in known]
    if unknown:
        raise ConfigError(f"no slide {', '.join(unknown)} in the ledger of inbox {inbox_id}",
                          hint="the IDs are in the inbox runs' logs and batch tables; or use --all-failed")
    given = given_options(args)
    if args.reload_config or given:
        settings, options = _rebuilt_settings(inbox_id, record, given, config)
        source = config_source(args)
        if source != record.get("config"):
            print(f"wsiflow: warning: inbox {inbox_id} was served with "
                  f"{record.get('config') or 'the built-in config'}; its settings now come from "
                  f"{source or 'the built-in config'}", file=sys.stderr)
        save_inbox(record["inbox"], settings, inbox_id=inbox_id, options=options, config_file=source)
        on_top = f" (given here: {', '.join('--' + name.replace('_', '-') for name in given)})" if given else ""
        print(f"inbox {inbox_id}: settings rebuilt from {source or 'the built-in config'} and serve's "
              f"options{on_top}; they apply from the next look")

    running = look_running(inbox_id)
    lines: list[str] = []
    all_due, due = True, 0
    with update_ledger(inbox_id) as ledger:
        by_slide: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
        for entry in ledger.values():
            by_slide[entry.get("slide_id")].append(entry)
        if args.all_failed:
            asked = [s for s, entries in by_slide.items() if any(e["status"] == "failed" for e in entries)]
        else:
            asked = list(dict.fromkeys(args.slide_ids))
        for slide_id in asked:
            if slide_id is None:  # unreadable slides have no slide ID: only --all-failed reaches them
                failed = [e for e in by_slide[None] if e["status"] == "failed"]
                text, ok = _mark(failed, running)
                lines.append(f"{len(failed)} slide(s) without a slide ID (unreadable): {text}")
                due += len(failed) if ok else 0
            else:
                text, ok = _mark(by_slide[slide_id], running)
                lines.append(f"{slide_id}: {text}")
                due += ok
            all_due = all_due and ok
    for line in lines:
        print(line)
    if not asked:
        print(f"inbox {inbox_id}: no failed slides")
    elif due:
        print(f"inbox {inbox_id}: {due} slide(s) due at the next look of deployment wsiflow-inbox/{inbox_id}")
    return EXIT_OK if all_due else EXIT_FAILED
