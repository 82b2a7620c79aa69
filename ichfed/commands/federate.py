"""`ichfed federate`: coordinator helpers around a Flower run (status and report of a state folder)."""

from __future__ import annotations

import json

from shared.plumbing.errors import IchfedError


def register(sub) -> None:
    p = sub.add_parser("federate", help="coordinator helpers: run status and report from a server state folder")
    psub = p.add_subparsers(dest="federate_command", metavar="ACTION")
    st = psub.add_parser(
        "status", help="how the latest run of a server state folder stands: finished, failed (why) or running",
        description="Reads STATE_DIR/latest_run and that run's events.jsonl (or STATE_DIR/events.jsonl of an "
        "older state folder). Exit code: 0 the run finished, 1 it failed (the reason is printed), 3 it is still "
        "running or ended without an end event; 2 for a bad STATE_DIR. Stop a run with: flwr stop RUN_ID <connection>.")
    st.add_argument("state_dir", metavar="STATE_DIR", help="the run config's state-dir")
    st.add_argument("--run", metavar="RUN_ID", help="this run instead of the latest (a folder name in STATE_DIR/runs)")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=status)
    rp = psub.add_parser("report", help="(re)write report.md/.html and figures from a run's report.json")
    rp.add_argument("state_dir", metavar="STATE_DIR", help="the run config's state-dir")
    rp.add_argument("--run", metavar="RUN_ID", help="this run instead of the latest")
    rp.add_argument("--out", help="report folder (default: the run's folder)")
    rp.set_defaults(func=report)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def status(args) -> int:
    """Print how the run stands; exit 0 finished, 1 failed, 3 running or unknown."""
    from server.run_status import locate_run, render, run_status

    st = run_status(locate_run(args.state_dir, args.run))
    print(json.dumps(st.to_dict(), indent=2) if args.json else render(st))
    return st.exit_code


def report(args) -> int:
    from server.report import paper_table_markdown, write_report
    from server.run_status import locate_run, report_file

    src = report_file(locate_run(args.state_dir, args.run), "report.json")
    if not src.is_file():
        raise IchfedError(f"{src}: not found (the run has not finished, or STATE_DIR is not a server state folder)")
    from shared.plumbing.files import read_json

    data = read_json(src)
    paths = write_report(data, args.out or src.parent)
    print(paper_table_markdown(data))
    print(f"report: {paths['markdown']}")
    return 0
