"""GPU check with a real vLLM (0.26) under llmuxd, beside the llmux-sim check (check.py).

Run on the GPU machine by tests/gpu/vllm_check.sh, after the offline wheel set is
installed. Builds a random Llama (no hub), then runs one of these scenarios and
writes JSON lines (one per step) and a Markdown table:

  cycle   two models, levels 1-4 on one of them (`llmuxctl sleep --level N`, then
          swap back), level 4 over and over across both (a restored tree dumped
          again; both checkpointed at once), greedy output compared after every
          wake, llmuxd killed with SIGKILL and adoption checked, then a shutdown
          that must leave no process of any model's group.
  resident three models of 27 GiB under a 64 GiB budget, used only through the front
          with the openai client: two resident answer in turn, the third evicts the LRU.
  weights a KV-heavy model (GPU footprint mostly KV cache) checkpointed with
          checkpoint_sleep 0, 1 and 2, in suspend and plugin mode: image size,
          dump, restore and total wake seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from llmuxctl.client import request  # noqa: E402
from tests.daemon_fixture import group_pids as group_alive  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog and then"
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0", "NCCL_NVLS_ENABLE": "0",
       "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def make_model(path: Path, hidden: int, layers: int) -> None:
    """A random Llama with a BPE tokenizer trained on local text; seeded, so the same
    folder always gives the same greedy output."""
    if (path / "config.json").exists() or os.environ.get("LLMUX_CHECK_NO_MODEL"):
        return  # made already, or a rehearsal with llmux-sim
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    text = [p.read_text(errors="replace") for p in ROOT.rglob("*.md")] + [PROMPT] * 10
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=max(4, hidden // 128),
                      num_key_value_heads=max(4, hidden // 128), max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)


def gpu_used() -> int:
    if not os.path.exists("/dev/nvidiactl"):
        return -1
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else -1


class Llmuxd:
    def __init__(self, work: Path, models: dict, criu: str, plugin_dir: str,
                 daemon_extra: tuple[str, ...] = ()) -> None:
        self.work, self.models, self.criu, self.daemon_extra = work, models, criu, daemon_extra
        self.sock = str(work / "llmux.sock")
        self.cfg = work / "llmux.toml"
        self.write(plugin_dir)
        self.proc = None

    def write(self, plugin_dir: str) -> None:
        lines = ["[daemon]", f'socket = "{self.sock}"', f'state_dir = "{self.work}/state"',
                 f'vllm_command = {json.dumps(os.environ.get("LLMUX_VLLM", "vllm").split())}',
                 'startup_timeout = "10m"', "stop_timeout = 30", "drain_timeout = 30",
                 "sleep_timeout = 300", "wake_timeout = 300", *self.daemon_extra,
                 "[daemon.checkpoint]", f'criu_path = "{self.criu}"',
                 f'cuda_plugin_dir = "{plugin_dir}"', f'images_dir = "{self.work}/images"']
        for name, m in self.models.items():
            lines += [f"[models.{name}]", f'model = "{m["path"]}"', f"port = {m['port']}",
                      f"sleep_level = {m.get('level', 4)}",
                      f"checkpoint_sleep = {m.get('checkpoint_sleep', 1)}",
                      *([f'gpu_memory = "{m["gpu_memory"]}"'] if "gpu_memory" in m else []),
                      *([f"gpus = {json.dumps(m['gpus'])}"] if "gpus" in m else []),
                      "args = " + json.dumps(["--enforce-eager", "--gpu-memory-utilization",
                                              str(m["util"]), "--max-model-len", "2048"]),
                      "env = " + "{ " + ", ".join(f'{k} = "{v}"' for k, v in ENV.items()) + " }"]
        self.cfg.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        log = open(self.work / "llmuxd.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmuxd", "--config", str(self.cfg)],
                                     cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.call({"cmd": "ping"}).get("ok"):
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError("llmuxd did not answer")

    def call(self, obj: dict, timeout: float = 900) -> dict:
        return list(request(self.sock, obj, timeout=timeout))[-1]

    def status(self) -> dict:
        return self.call({"cmd": "status"})["models"]

    def generate(self, name: str) -> str:
        m = self.models[name]
        body = json.dumps({"model": name, "prompt": PROMPT, "max_tokens": 24,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{m['port']}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["text"]

    def shutdown(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def tail(self, name: str | None = None, n: int = 2500) -> str:
        path = self.work / "state" / "logs" / f"{name}.log" if name else self.work / "llmuxd.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


def phases_of(reply: dict, model: str) -> dict:
    """Seconds per phase of `model` in a reply (a phase lasts until the next one)."""
    phases = reply.get("phases", [])
    out = {}
    for i, (t, name, m) in enumerate(phases):
        end = phases[i + 1][0] if i + 1 < len(phases) else reply.get("elapsed", t)
        if m == model:
            out[name] = round(out.get(name, 0) + end - t, 2)
    return out


class Recorder:
    def __init__(self, out: Path) -> None:
        self.out, self.rows = out, []

    def add(self, **row) -> dict:
        row["gpu_mib"] = gpu_used()
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


def step(rec: Recorder, d: Llmuxd, what: str, obj: dict, model: str, **extra) -> dict:
    t0 = time.monotonic()
    reply = d.call(obj)
    others = {m for _, _, m in reply.get("phases", []) if m != model}
    row = {"step": what, "ok": reply.get("ok"), "seconds": round(time.monotonic() - t0, 2),
           "phases": phases_of(reply, model),
           "other_phases": {m: phases_of(reply, m) for m in sorted(others)}, "warnings": reply.get("warnings"),
           "error": reply.get("error"), **extra}
    if not reply.get("ok"):
        row["llmuxd_log"] = d.tail()
        row["model_log"] = d.tail(model)
    return rec.add(**row)


def cycle(work: Path, model: Path, criu: str, plugin_dir: str, rec: Recorder) -> None:
    models = {"a": {"path": str(model), "port": 18101, "util": 0.03},
              "b": {"path": str(model), "port": 18102, "util": 0.03, "checkpoint_sleep": 2}}
    d = Llmuxd(work, models, criu, plugin_dir)
    d.start()
    try:
        step(rec, d, "cold start a", {"cmd": "swap", "model": "a"}, "a")
        ref = {"a": d.generate("a")}
        rec.add(step="reference a", text=ref["a"])
        for level in (1, 2, 3, 4):
            r = step(rec, d, f"sleep a --level {level}",
                     {"cmd": "sleep", "model": "a", "level": level}, "a",
                     state=None, level=level)
            st = d.status()["a"]
            r["state"], r["image_bytes"] = st["state"], st.get("image_bytes")
            rec.add(step=f"asleep at {level}", state=st["state"], image_bytes=st.get("image_bytes"),
                    criu_mode=st.get("criu_mode"))
            step(rec, d, f"wake a from {level}", {"cmd": "swap", "model": "a"}, "a")
            text = d.generate("a")
            rec.add(step=f"output a after level {level}", identical=text == ref["a"], text=text)
        step(rec, d, "cold start b (a dumped)", {"cmd": "swap", "model": "b"}, "b")
        ref["b"] = d.generate("b")
        for i, name in enumerate(["a", "b", "a", "b"]):
            other = "b" if name == "a" else "a"
            r = step(rec, d, f"swap {name} ({other} dumped, {name} restored) #{i + 1}",
                     {"cmd": "swap", "model": name}, name)
            st = d.status()
            text = d.generate(name)
            rec.add(step=f"output {name} after restore #{i + 1}", identical=text == ref[name],
                    other_state=st[other]["state"], other_image_bytes=st[other].get("image_bytes"),
                    criu_mode=st[other].get("criu_mode"),
                    dumped_phases=r["other_phases"].get(other))
        shm = sorted(p for p in os.listdir("/dev/shm") if p.startswith("link_remap."))
        rec.add(step="link_remap files in /dev/shm while b is checkpointed", files=shm)
        # adoption after SIGKILL
        before = d.status()
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        d.start()
        after = d.status()
        rec.add(step="adopted after kill -9",
                same={n: (before[n]["state"], before[n]["pid"]) == (after[n]["state"], after[n]["pid"])
                      for n in before}, states={n: after[n]["state"] for n in after},
                identical=d.generate("b") == ref["b"])
        step(rec, d, "swap a after adoption (restore)", {"cmd": "swap", "model": "a"}, "a")
        rec.add(step="output a after adoption restore", identical=d.generate("a") == ref["a"])
        groups = {m["pid"] for st in (before, after, d.status()) for m in st.values()
                  if m.get("pid")}
    finally:
        d.shutdown()
    time.sleep(1)
    left = {g: group_alive(g) for g in groups}
    shm = sorted(p for p in os.listdir("/dev/shm") if p.startswith("link_remap."))
    rec.add(step="after shutdown", exit_code=d.proc.returncode, processes_left=left,
            link_remap_left=shm)


def weights(work: Path, model: Path, criu: str, plugin_dir: str, empty_dir: str, rec: Recorder,
            variants: list[int], util: float, deadline: float) -> None:
    models = {f"c{v}": {"path": str(model), "port": 18110 + v, "util": util, "checkpoint_sleep": v}
              for v in variants}
    d = Llmuxd(work, models, criu, empty_dir)
    d.start()
    try:
        for v in variants:
            name = f"c{v}"
            if time.monotonic() > deadline:
                rec.add(step=f"{name} skipped: out of time")
                break
            step(rec, d, f"cold start {name}", {"cmd": "swap", "model": name}, name)
            ref = d.generate(name)
            active_mib = gpu_used()
            for mode, folder in (("suspend", empty_dir), ("plugin", plugin_dir)):
                if time.monotonic() > deadline - 60:
                    break
                d.write(folder)
                d.call({"cmd": "reload"})
                s = step(rec, d, f"dump {name} ({mode})", {"cmd": "sleep", "model": name,
                                                        "level": 4}, name)
                st = d.status()[name]
                asleep_mib = gpu_used()
                w = step(rec, d, f"restore {name} ({mode})", {"cmd": "swap", "model": name}, name)
                text = d.generate(name)
                rec.add(step=f"weights axis {name} {mode}", checkpoint_sleep=v, mode=mode,
                        criu_mode=st.get("criu_mode"), image_bytes=st.get("image_bytes"),
                        sleep_s=s["seconds"], wake_s=w["seconds"], sleep_phases=s["phases"],
                        wake_phases=w["phases"], active_mib=active_mib, asleep_mib=asleep_mib,
                        identical=text == ref, state=st["state"])
            step(rec, d, f"stop {name}", {"cmd": "stop", "model": name}, name)
    finally:
        d.shutdown()


FRONT = "127.0.0.1:18000"


def front_get(path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{FRONT}{path}", timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def resident(work: Path, model: Path, criu: str, plugin_dir: str, rec: Recorder) -> None:
    """Three real vLLMs of 27 GiB under a 64 GiB budget, used only through the front with the
    openai client: two stay resident and answer in turn without a swap; the third evicts the
    least recently used; a pooled upstream connection idle past uvicorn's keep-alive still works."""
    from openai import OpenAI
    models = {n: {"path": str(model), "port": 18120 + i, "util": 0.18, "level": 1,
                  "gpu_memory": "27GiB"} for i, n in enumerate("abc")}
    models["c"]["gpus"] = [0]  # CUDA_VISIBLE_DEVICES=0 and CUDA_DEVICE_ORDER=PCI_BUS_ID
    d = Llmuxd(work, models, criu, plugin_dir,
               daemon_extra=('gpu_memory = "64GiB"', "[daemon.front]", f'listen = "{FRONT}"'))
    d.start()
    client = OpenAI(base_url=f"http://{FRONT}/v1", api_key="unused", max_retries=0, timeout=900)

    def ask(name: str) -> tuple[str, float]:
        t0 = time.monotonic()
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
        return r.choices[0].text, round(time.monotonic() - t0, 3)

    def snapshot() -> dict:
        st = d.call({"cmd": "status"})
        return {"resident": st.get("resident"), "gpu": st.get("gpu"),
                "models": {n: {k: m.get(k) for k in ("state", "pid", "gpu_measured", "current_level",
                                                     "gpus")}
                           for n, m in st["models"].items()}}
    try:
        ref = {}
        for name in ("a", "b"):
            ref[name], secs = ask(name)
            rec.add(step=f"first request for {name} (cold start through the front)", seconds=secs,
                    status=snapshot())
        before = snapshot()
        turns = []
        for name in ("a", "b") * 4:
            text, secs = ask(name)
            turns.append({"model": name, "seconds": secs, "identical": text == ref[name]})
        after = snapshot()
        rec.add(step="a and b in turn, both resident", turns=turns,
                no_swap=before["models"] == after["models"], resident=after["resident"],
                gpu=after["gpu"], measured={n: after["models"][n]["gpu_measured"] for n in "ab"})
        text, secs = ask("a")  # a is now the most recently used; b the least
        ref["c"], secs = ask("c")
        st = snapshot()
        rec.add(step="first request for c (evicts the least recently used)", seconds=secs,
                resident=st["resident"], states={n: m["state"] for n, m in st["models"].items()},
                expected_evicted="b")
        text, secs = ask("a")
        rec.add(step="a after c came in", seconds=secs, identical=text == ref["a"],
                resident=snapshot()["resident"])
        time.sleep(7)  # past uvicorn's 5 s keep-alive: the front's pooled connection is closed
        text, secs = ask("a")
        rec.add(step="a after 7 s idle (stale keep-alive)", seconds=secs, identical=text == ref["a"])
        events, t0 = 0, time.monotonic()
        for _ in client.completions.create(model="c", prompt=PROMPT, max_tokens=64, temperature=0,
                                           stream=True):
            events += 1
        rec.add(step="stream from c through the front", events=events,
                seconds=round(time.monotonic() - t0, 3))
        text, secs = ask("b")
        st = snapshot()
        rec.add(step="b again (wakes from level 1)", seconds=secs, identical=text == ref["b"],
                resident=st["resident"], states={n: m["state"] for n, m in st["models"].items()})
        code, body = front_get("/v1/models")
        rec.add(step="GET /v1/models", code=code, body=body[:800])
        code, body = front_get("/metrics")
        rec.add(step="GET /metrics of the front", code=code,
                lines=[ln for ln in body.splitlines() if ln.startswith("llmux")][:60])
        shown = subprocess.run([sys.executable, "-m", "llmuxctl", "--socket", d.sock, "status"],
                               capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, COLUMNS="80"))
        rec.add(step="llmuxctl status", text=shown.stdout + shown.stderr)
        groups = {m["pid"] for m in snapshot()["models"].values() if m.get("pid")}
    finally:
        d.shutdown()
    time.sleep(1)
    rec.add(step="after shutdown", exit_code=d.proc.returncode,
            processes_left={g: group_alive(g) for g in groups})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["cycle", "weights", "resident"])
    ap.add_argument("--criu", required=True)
    ap.add_argument("--plugin-dir", required=True)
    ap.add_argument("--work", default="/tmp/llmux-vllm")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="0,1,2")
    ap.add_argument("--util", type=float, default=0.15)
    ap.add_argument("--budget", type=float, default=540, help="seconds this run may take")
    opts = ap.parse_args()
    deadline = time.monotonic() + opts.budget
    work = Path(opts.work) / opts.scenario
    work.mkdir(parents=True, exist_ok=True)
    empty = Path(opts.work) / "no-plugin"
    empty.mkdir(exist_ok=True)
    rec = Recorder(Path(opts.out))
    t0 = time.monotonic()
    try:
        if opts.scenario in ("cycle", "resident"):
            path = Path(opts.work) / "tiny"
            make_model(path, 256, 2)
            run = cycle if opts.scenario == "cycle" else resident
            run(work, path, opts.criu, opts.plugin_dir, rec)
        else:
            path = Path(opts.work) / "big"
            make_model(path, 3072, 16)
            rec.add(step="model made", seconds=round(time.monotonic() - t0, 1))
            weights(work, path, opts.criu, opts.plugin_dir, str(empty), rec,
                    [int(v) for v in opts.variants.split(",")], opts.util, deadline)
    except Exception as exc:  # record and end: the caller reads what came before
        import traceback
        rec.add(step="crashed", error=traceback.format_exc()[-3000:])
        raise SystemExit(f"{opts.scenario}: {exc}")


if __name__ == "__main__":
    main()
