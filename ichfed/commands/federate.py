"""`ichfed federate`: coordinator helpers around a Flower run (status and report of a state folder)."""

from __future__ import annotations

import json
from pathlib import Path

from shared.plumbing.errors import IchfedError


def register(sub) -> None:
    p = sub.add_parser("federate", help="coordinator helpers: run status and report from a server state folder")
    psub = p.add_subparsers(dest="federate_command", metavar="ACTION")
    st = psub.add_parser("status", help="last checkpoint (round, sites, pooled metrics) of a server state folder")
    st.add_argument("state_dir", metavar="STATE_DIR")
    st.set_defaults(func=status)
    rp = psub.add_parser("report", help="(re)write report.md/.html and figures from the newest run's report.json")
    rp.add_argument("state_dir", metavar="STATE_DIR")
    rp.add_argument("--out", help="report folder (default: the run's folder)")
    rp.set_defaults(func=report)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def status(args) -> int:
    from server.checkpoint import CheckpointStore

    ckpt = CheckpointStore(args.state_dir).latest()
    if ckpt is None:
        raise IchfedError(f"{args.state_dir}: no checkpoint yet")
    last = ckpt.history[-1] if ckpt.history else {}
    pooled = last.get("evaluate", {}).get("pooled", {})
    print(json.dumps({"round": ckpt.round, "of": ckpt.run.get("num_rounds"), "bundle_hash": ckpt.run.get("bundle_hash"),
                      "sites": ckpt.run.get("sites"), "pooled": pooled, "checkpoint": str(ckpt.path)}, indent=2))
    return 0


def report(args) -> int:
    from server.report import paper_table_markdown, write_report
    from server.run_folder import latest_run

    # The newest run's folder (<state_dir>/runs/<run_id>/, named by latest_run); STATE_DIR/report/ before it.
    src = (latest_run(args.state_dir) or Path(args.state_dir) / "report") / "report.json"
    if not src.is_file():
        raise IchfedError(f"{src}: not found (the run has not finished, or STATE_DIR is not a server state folder)")
    from shared.plumbing.files import read_json

    data = read_json(src)
    paths = write_report(data, args.out or src.parent)
    print(paper_table_markdown(data))
    print(f"report: {paths['markdown']}")
    return 0
