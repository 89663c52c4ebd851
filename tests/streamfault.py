"""Relay an image stream from stdin to a receiver, and break it on cue.

    streamfault.py --kind pre-dump|dump --nth N --after BYTES --do cut|flip|kill
                   -- RECEIVER-COMMAND...

Runs RECEIVER-COMMAND with its stdin fed from ours and its stdout as ours. Once
the Nth dump-begin of that kind passed and BYTES more bytes were relayed:
  cut   kill our ssh session process (the link dies) and close the receiver's input;
  flip  invert one bit of the next byte relayed, then carry on;
  kill  SIGKILL the receiver.
The tests run it as the destination's remote command (tests/test_migrate.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointer.images.stream import DUMP_BEGIN, decode_control, read_messages  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="pre-dump")
    ap.add_argument("--nth", type=int, default=1)
    ap.add_argument("--after", type=int, default=0)
    ap.add_argument("--do", choices=["cut", "flip", "kill"], required=True)
    ap.add_argument("receiver", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.receiver[1:] if args.receiver[:1] == ["--"] else args.receiver
    receiver = subprocess.Popen(command, stdin=subprocess.PIPE)
    state = {"seen": 0, "armed": False, "left": args.after, "done": False}

    def read(n: int) -> bytes:
        data = os.read(0, n)
        if state["armed"] and not state["done"] and data:
            if len(data) <= state["left"]:
                state["left"] -= len(data)
            else:
                state["done"] = True
                data = strike(receiver, args.do, data, state["left"])
        receiver.stdin.write(data)
        receiver.stdin.flush()
        return data

    try:
        for kind, payload in read_messages(read):
            if kind == DUMP_BEGIN and decode_control(payload).get("kind") == args.kind:
                state["seen"] += 1
                state["armed"] = state["seen"] == args.nth
        # the rest after END, if any, goes on unchanged
        while data := os.read(0, 1 << 16):
            receiver.stdin.write(data)
    except Exception:
        pass  # the receiver reports what went wrong; we only relay
    try:
        receiver.stdin.close()
    except OSError:
        pass
    return receiver.wait()


def strike(receiver: subprocess.Popen, action: str, data: bytes, at: int) -> bytes:
    if action == "flip":
        return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
    if action == "kill":
        receiver.kill()
        receiver.wait()
        os._exit(1)
    receiver.stdin.write(data[:at])
    receiver.stdin.close()
    os.kill(os.getppid(), signal.SIGKILL)  # our sshd session: the link is gone
    receiver.wait()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
