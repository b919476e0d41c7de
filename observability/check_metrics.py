#!/usr/bin/env python3
"""`promtool check metrics` on what Conclave components serve, plus Conclave's own rules.

    check_metrics.py http://198.18.0.12:9090/metrics [URL ...]
    check_metrics.py --targets targets.json      # every target of a prometheus_config.py targets file

For each /metrics: every family has HELP text, `promtool check metrics` (naming, units,
counters ending in _total) is clean, and no label could name a participant, meeting, user or
address. Components speak OpenMetrics (prometheus-client); promtool 2.42 lints the text
format 0.0.4, so counter families are renamed with their _total suffix and # UNIT / # EOF
lines dropped first, which changes no sample. Exit 1 listing every problem.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

# Labels that would make a series per participant, meeting, user or address: never allowed.
PER_PARTICIPANT = {"participant", "participant_id", "participantid", "sender", "sender_index", "sub", "user",
                   "user_id", "name", "meeting", "meeting_id", "mid", "address", "addr", "ip", "source",
                   "src", "peer", "client", "token", "identity", "caller", "callee", "number", "uri"}


def openmetrics_to_text(text: str) -> str:
    counters = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) counter$", text, re.M)}
    out = []
    for line in text.splitlines():
        if line == "# EOF" or line.startswith("# UNIT "):
            continue
        m = re.match(r"# (HELP|TYPE) (\S+)(.*)$", line)
        if m and m.group(2) in counters:
            line = f"# {m.group(1)} {m.group(2)}_total{m.group(3)}"
        out.append(line)
    return "\n".join(out) + "\n"


def problems(text: str, promtool: str) -> list:
    found = []
    families = re.findall(r"^# TYPE (\S+) ", text, re.M)
    if not families:
        found.append("no metric families")
    found += [f"{f}: no HELP text" for f in families if not re.search(rf"^# HELP {re.escape(f)} \S", text, re.M)]
    labels = set(re.findall(r"[{,](\w+)=\"", text))
    found += [f"label {name!r} is per participant/meeting/address" for name in sorted(labels & PER_PARTICIPANT)]
    r = subprocess.run([promtool, "check", "metrics"], input=openmetrics_to_text(text), capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        found += [f"promtool: {line}" for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", nargs="*")
    p.add_argument("--targets", type=Path, help="file_sd JSON written by prometheus_config.py targets")
    p.add_argument("--promtool", default=shutil.which("promtool") or "promtool")
    args = p.parse_args(argv)
    urls = list(args.urls)
    if args.targets:
        for group in json.loads(args.targets.read_text()):
            urls += [f"http://{t}/metrics" for t in group["targets"]]
    if not urls:
        p.error("give URLs or --targets")
    failed = 0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=15) as resp:
                text = resp.read().decode()
        except OSError as e:
            print(f"FAIL {url}: {e}")
            failed += 1
            continue
        found = problems(text, args.promtool)
        print(f"{'FAIL' if found else 'ok  '} {url}")
        for f in found:
            print(f"     {f}")
        failed += bool(found)
    print(f"{len(urls)} endpoints, {failed} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
