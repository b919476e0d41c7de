#!/usr/bin/env python3
"""`make demo`: Conclave installed on the local cluster as a user would, and a
short encrypted meeting of three participants through it. Prints what
happened; exits non-zero if the meeting did not work."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from deploy import TONES, conclave_installed, install_conclave, run_meeting, setup_meetings_namespace, wait_ready  # noqa: E402
from kube import kubectl  # noqa: E402

NS = "demo"


def main() -> int:
    print("== installing the conclave chart (operator, CRDs, RBAC) with the real Helm engine")
    install_conclave(upgrade=conclave_installed())
    if not kubectl("get", "ns", NS, "--ignore-not-found", "-o", "name").strip():
        print(f"== namespace {NS}: KeyManagementServer, MeetingZone (2 relays), recording and telephony pools")
        setup_meetings_namespace(NS)
    for kind, name in (("kms", "main"), ("mz", "zone-a"), ("cp", "recorder"), ("cp", "phones")):
        wait_ready(NS, kind, name)
        print(f"   {kind}/{name}: Ready")
    print(kubectl("get", "conclave", "-n", NS))
    print("== a meeting: three participants, each sending a tone and a chat line, end-to-end encrypted")
    reports = run_meeting(NS)
    ok = True
    index_of = {i: r["sender_index"] for i, r in reports.items()}
    for i, r in reports.items():
        heard = {j: r["dominant_hz"].get(str(index_of[j])) for j in TONES if j != i}
        chats = [c["text"] for c in r["chats"]]
        good = all(h is not None and abs(h - TONES[j]) < 15 for j, h in heard.items())
        ok &= good and r["joined"]
        print(f"   user-{i} (sent {TONES[i]:.0f} Hz): heard " +
              ", ".join(f"user-{j} at {h:.0f} Hz" if h else f"nothing from user-{j}" for j, h in heard.items()) +
              f"; chat: {chats}; epochs {r['epochs']}")
    print("== demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
