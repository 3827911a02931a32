#!/usr/bin/env python3
"""A Warren exec handler in Python: sums a list of numbers into a report.

Warren writes the task to stdin as one JSON object:
    {"id": "...", "type": "report.build", "attempt": 1, "args": {...}}
What this program prints on stdout is the task's result (JSON here).
Exit 0: success; exit 75: retry later; any other code: permanent failure,
with the last lines of stderr as the message. A stderr line
"warren:progress <done> [<total>]" reports progress.
"""

import json
import sys

task = json.load(sys.stdin)
args = task.get("args")
if not isinstance(args, dict) or not isinstance(args.get("items"), list):
    print("args must be an object with a list 'items'", file=sys.stderr)
    sys.exit(2)

items = args["items"]
total = 0
for i, x in enumerate(items, 1):
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        print(f"item {i} is not a number: {x!r}", file=sys.stderr)
        sys.exit(2)
    total += x
    print(f"warren:progress {i} {len(items)}", file=sys.stderr, flush=True)

json.dump(
    {
        "task_id": task["id"],
        "attempt": task["attempt"],
        "count": len(items),
        "sum": total,
    },
    sys.stdout,
)
