"""GPU check: run llmuxd on a real GPU with llmux-sim holding real CUDA memory, and
print, per level, GPU memory before/after sleep, sleep and wake seconds, and whether
the contents survived. With --tp, the two-GPU tensor-parallel variant (levels 3, 4).

Run by tests/gpu/check.sh on the GPU machine (not part of the CPU test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from llmuxctl.client import request  # noqa: E402


def gpu_used() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    def __init__(self, level: int, args: list[str], criu: str, env: dict) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"llmux-gpu-{level}-"))
        self.sock = str(self.dir / "s.sock")
        self.ports = {"g": free_port(), "h": free_port()}
        sim = json.dumps([sys.executable, "-m", "llmuxd.sim"])
        cfg = f"""[daemon]
socket = "{self.sock}"
state_dir = "{self.dir}/state"
vllm_command = {sim}
startup_timeout = "10m"
stop_timeout = 30
[daemon.checkpoint]
criu_path = "{criu}"
[models.g]
model = "gpu/g"
port = {self.ports['g']}
sleep_level = {level}
args = {json.dumps(args)}
[models.h]
model = "cpu/h"
port = {self.ports['h']}
sleep_level = 5
"""
        (self.dir / "llmux.toml").write_text(cfg)
        self.proc = subprocess.Popen([sys.executable, "-m", "llmuxd", "--config",
                                      str(self.dir / "llmux.toml")], cwd=ROOT,
                                     stdout=open(self.dir / "llmuxd.log", "wb"),
                                     stderr=subprocess.STDOUT, env={**os.environ, **env})
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline:
                raise SystemExit("llmuxd did not start: " + (self.dir / "llmuxd.log").read_text())
            time.sleep(0.05)

    def call(self, obj: dict) -> dict:
        return list(request(self.sock, obj, timeout=900))[-1]

    def swap(self, name: str) -> dict:
        reply = self.call({"cmd": "swap", "model": name})
        if not reply["ok"]:
            raise SystemExit(f"swap {name} failed: {reply['error']}\n" + self.logs())
        return reply

    def sim(self, path: str = "/sim/state", method: str = "GET") -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports['g']}{path}", method=method)
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"{}")

    def logs(self) -> str:
        text = (self.dir / "llmuxd.log").read_text()[-3000:]
        g = self.dir / "state" / "logs" / "g.log"
        return text + ("\n--- g.log ---\n" + g.read_text()[-3000:] if g.exists() else "")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def phase_span(reply: dict, model: str) -> float:
    """Seconds from the first phase of `model` in a swap reply to the next other-model phase
    (or the end of the swap)."""
    phases = reply["phases"]
    start = next(t for t, _, m in phases if m == model)
    after = [t for t, _, m in phases if m != model and t > start]
    return (min(after) if after else reply["elapsed"]) - start


def intact(state: dict) -> str:
    workers = state.get("workers") or []
    cuda = [w.get("cuda") for w in workers] if workers else [state.get("cuda")]
    if not all(cuda):
        return "no CUDA"
    return "yes" if all(c.get("intact") for c in cuda) else "NO"


def check_level(level: int, args: list[str], criu: str, env: dict, tp: int) -> dict:
    run = Run(level, args, criu, env)
    try:
        run.swap("g")
        base = run.sim()
        before = gpu_used()
        allreduce0 = run.sim("/sim/allreduce", "POST") if tp > 1 else None
        to_h = run.swap("h")
        asleep = gpu_used()
        to_g = run.swap("g")
        after = run.sim()
        allreduce = run.sim("/sim/allreduce", "POST") if tp > 1 else None
        status = run.call({"cmd": "status"})["models"]["g"]
        return {"level": level, "tp": tp, "mib_active": before[:tp], "mib_asleep": asleep[:tp],
                "sleep_s": round(phase_span(to_h, "g"), 2), "wake_s": round(phase_span(to_g, "g"), 2),
                "intact": intact(after) if level != 2 else f"reloaded ({intact(after)})",
                "intact_before": intact(base), "criu_mode": status.get("criu_mode"),
                "allreduce": None if tp == 1 else bool(allreduce0 and allreduce0.get("ok")
                                                       and allreduce.get("ok")),
                "real_nccl": None if tp == 1 else allreduce.get("real")}
    finally:
        run.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--criu", required=True)
    ap.add_argument("--mb", type=int, default=8192)
    ap.add_argument("--levels", default="1,2,3,4")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()
    env = {"NCCL_NVLS_ENABLE": "0"}
    rows = []
    for level in [int(x) for x in opts.levels.split(",")]:
        args = ["--cuda-mb", str(opts.mb)]
        if opts.tp > 1:
            args += ["--tensor-parallel-size", str(opts.tp), "--enforce-eager",
                     "--disable-custom-all-reduce"]
        t0 = time.monotonic()
        try:
            row = check_level(level, args, opts.criu, env, opts.tp)
        except SystemExit as exc:
            row = {"level": level, "tp": opts.tp, "error": str(exc)[:3000]}
        row["total_s"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = "| level | TP | GPU MiB active | GPU MiB asleep | sleep s | wake s | contents intact |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['level']} | {r['tp']} | error: {r['error'][:200]} | | | | |")
            continue
        extra = f", all-reduce {'ok' if r['allreduce'] else 'FAILED'}" if r["tp"] > 1 else ""
        mode = f" ({r['criu_mode']} mode)" if r["criu_mode"] else ""
        lines.append(f"| {r['level']}{mode} | {r['tp']} | {r['mib_active']} | {r['mib_asleep']} | "
                     f"{r['sleep_s']} | {r['wake_s']} | {r['intact']}{extra} |")
    table = "\n".join(lines)
    print(table)
    if opts.out:
        Path(opts.out).write_text(table + "\n\n" + "\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
