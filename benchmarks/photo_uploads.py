"""Photo-sized uploads: what each image costs the API process, on both engines and on vLLM's own server.

    .venv/bin/python benchmarks/photo_uploads.py [--before /tmp/old] [--json out.json] [--requests 96]
        [--servers service-transformers,service-vllm,vllm-serve] [--uploads png112,jpeg1080,jpeg12mp]

Issue 36, item 1 (about 8 minutes on 2 cores; needs py-spy, in the dev extra). The demo model (112 px) keeps
the model cheap, so what is left is the API process: the one running uvicorn (on vLLM also ``AsyncLLM``'s
input processing; its engine core and worker are other processes). Each server runs in its own process group
on a free loopback port: ``python -m service --engine transformers|vllm`` (``/detect`` as multipart and
``/v1/chat/completions`` with a data URL), and vLLM's own OpenAI server (``python -m
vllm.entrypoints.openai.api_server``, which ``vllm serve`` runs; the ``vllm`` script fails in this venv) with
the service's engine arguments and the project's plugin: the same model. Both vLLM servers get a 4 GiB KV cache
(``VLLM_CPU_KVCACHE_SPACE``). Every request carries its own image (8 base pictures per kind, stamped with the
request's index and re-encoded), so no processor cache hits: the service keys it by the bytes, vLLM by the pixels.

Per row: ``--warmup`` requests at once, then ``--requests`` with ``--concurrency`` in flight (closed loop):

- API CPU: utime+stime of the API process (``/proc``), per request. On transformers the model runs in the same
  process; its threads (``hf-generate`` and the OpenMP threads it starts: Linux calls them all ``python``) are
  told apart by the nice level ``model_nice`` gives them, and left out.
- GIL: ``py-spy record --gil --idle --nonblocking --threads --rate 200`` samples of the API process, model
  threads left out, / rate / requests. ``prep GIL on model thread``: the transformers engine's model thread
  runs PaliGemma's processor on the whole upload; its samples inside the processor.
- decode: the mean of the service's ``paligemma_image_decode_seconds`` (wall time in the decode pool).
- other CPU: the server's processes other than the API process and vLLM's ``VLLM::*`` ones.

``--before DIR`` adds rows for the service of another checkout (``cwd`` and ``PYTHONPATH`` DIR: ``service``
and the vLLM plugin import from there in every process; checked in the server's own stack); ``--code before``
runs those alone. Compare rows of one run only: the machine is shared, and the client runs on the same cores.
"""

# ruff: noqa: T201  (a command-line benchmark: the table goes to stdout)
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PYSPY = str(Path(PY).parent / "py-spy")  # pip install py-spy (the dev extra)
OBJECTS = "circle ; square ; triangle"  # the demo model's classes (docs/demo-model.md)
PROMPT = f"detect {OBJECTS}"  # what the service's chat route sends as the task prefix
MAX_TOKENS = 64  # the service's default max_new_tokens
UPLOADS = {"png112": (112, 112, "PNG"), "jpeg1080": (1920, 1080, "JPEG"), "jpeg12mp": (4032, 3024, "JPEG")}
SERVERS = ("service-transformers", "service-vllm", "vllm-serve")
ENDPOINTS = {"service-transformers": ("detect", "chat"), "service-vllm": ("detect", "chat"), "vllm-serve": ("chat",)}
TICK = os.sysconf("SC_CLK_TCK")
RATE = 200
BOUNDARY = "photo-uploads-boundary"
DECODE = "paligemma_image_decode_seconds"  # service/metrics.py
SCHEDULER = "service.engines.vllm_plugin.scheduler.prefix_lm_scheduler"  # as service/engines/vllm_config.py
GRAMMAR = "service.engines.vllm_plugin.grammar:DetectionGrammarProcessor"


@dataclass
class Row:
    code: str
    server: str
    endpoint: str
    upload: str
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    req_per_s: float = 0.0
    api_cpu_ms: float = 0.0
    gil_ms: float | None = None
    prep_gil_ms: float | None = None
    decode_ms: float | None = None
    other_cpu_ms: float = 0.0
    model_cpu_ms: float = 0.0
    completion_tokens: float = 0.0
    threads: dict[str, dict[str, float]] = field(default_factory=dict)
    pyspy: str = ""


def make_images(kind: str, count: int, folder: Path) -> list[bytes]:
    """``count`` distinct uploads of ``kind``: 8 base pictures, each copy stamped with its index in a corner."""
    width, height, fmt = UPLOADS[kind]
    if fmt == "PNG":
        from finetune.data.synth import render

        bases = [np.asarray(render(2, i, size=width)[0]) for i in range(8)]  # 2: the demo's held-out seed
    else:
        from finetune.data.synth import generate_photos

        generate_photos(folder / kind, 8, seed=36, width=width, height=height)
        bases = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((folder / kind / "images").glob("*.jpg"))]
    out = []
    for i in range(count):
        pixels = bases[i % len(bases)].copy()
        bits = np.array([(i >> b) & 1 for b in range(12)], dtype=np.uint8) * 255
        pixels[:4, :48] = np.repeat(bits, 4)[None, :, None]  # 12 bits of the index, 4x4 px each
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
        out.append(buffer.getvalue())
    return out


def body(endpoint: str, image: bytes, model: str) -> tuple[bytes, str]:
    """(request body, content type): a multipart ``/detect`` or a chat completion with a data URL."""
    mime = "image/png" if image[:4] == b"\x89PNG" else "image/jpeg"
    if endpoint == "detect":
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="objects"\r\n\r\n{OBJECTS}\r\n--{BOUNDARY}\r\n'
            f'Content-Disposition: form-data; name="image"; filename="x"\r\nContent-Type: {mime}\r\n\r\n'
        )
        return head.encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"
    url = f"data:{mime};base64,{base64.b64encode(image).decode()}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    chat = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0}
    return json.dumps({**chat, "max_tokens": MAX_TOKENS}).encode(), "application/json"


async def closed_loop(
    url: str, bodies: list[tuple[bytes, str]], concurrency: int
) -> tuple[float, int, Counter[str], int]:
    """(seconds, 2xx answers, errors by status, completion tokens) for ``bodies`` sent ``concurrency`` at a time."""
    errors: Counter[str] = Counter()
    done = [0, 0]
    queue = iter(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            for content, ctype in queue:
                try:
                    resp = await client.post(url, content=content, headers={"content-type": ctype})
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                if resp.status_code >= 300:
                    errors[str(resp.status_code)] += 1
                    continue
                done[0] += 1
                done[1] += int(resp.json()["usage"]["completion_tokens"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, done[0], errors, done[1]


def cpu_ticks(path: str) -> tuple[int, int, int]:
    """(utime + stime, cutime + cstime, nice) from a ``/proc/.../stat`` file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]), int(fields[16])


def descendants(pid: int) -> dict[int, str]:
    """pid -> name of each process below ``pid`` (vLLM calls its own ``VLLM::EngineCore``, ``VLLM::Worker``)."""
    import psutil  # a vLLM dependency

    out = {}
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            out[child.pid] = child.name()
    return out


@dataclass
class Snapshot:
    """CPU ticks of the API process's threads, of the process and of its descendants, at one moment."""

    threads: dict[int, tuple[int, int, int]]
    procs: dict[int, tuple[int, int, int]]
    names: dict[int, str]

    @classmethod
    def take(cls, pid: int) -> Snapshot:
        def read(paths: dict[int, str]) -> dict[int, tuple[int, int, int]]:
            out = {}
            for key, path in paths.items():
                with contextlib.suppress(OSError):  # ended meanwhile
                    out[key] = cpu_ticks(path)
            return out

        names = descendants(pid)
        threads = read({int(t): f"/proc/{pid}/task/{t}/stat" for t in os.listdir(f"/proc/{pid}/task")})
        return cls(threads, read({p: f"/proc/{p}/stat" for p in [pid, *names]}), names)


class Server:
    """One server in its own process group, killed with its whole group on close."""

    def __init__(self, name: str, tree: Path, log: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url, self.tree, self.log = f"http://127.0.0.1:{self.port}", tree, log
        # a 4 GiB KV cache on both vLLM servers; unset, vLLM's CPU worker wants 90 % of the host's memory free
        env = {"VLLM_CPU_KVCACHE_SPACE": "4", **os.environ, "PYTHONPATH": str(tree)}
        model = str(tree / "models" / "demo")
        if name == "vllm-serve":  # the service's engine arguments (service/engines/vllm_config.py) on the CPU
            config = json.loads((tree / "models" / "demo" / "config.json").read_text())
            tokens = (config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]) ** 2
            length = min(tokens + 2 + 256 + 512, config["text_config"]["max_position_embeddings"])  # as the service
            flags = f"--served-model-name demo --dtype float32 --max-model-len {length} --max-num-seqs 32"
            flags += " --no-enable-chunked-prefill --no-enable-prefix-caching --scheduler-cls " + SCHEDULER
            command = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *flags.split()]
            command += ["--limit-mm-per-prompt", '{"image": 1}', "--logits-processors", GRAMMAR]
        else:
            command = [PY, "-m", "service", "--model", model, "--engine", name.removeprefix("service-")]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=tree, env=env, stdout=out, stderr=out, start_new_session=True)
        self.pid = self.process.pid

    def wait_ready(self, path: str, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s: see {self.log}")

    def close(self) -> None:
        """SIGTERM to the whole group (vLLM shuts its engine down), SIGKILL to what is left after 30 s."""
        stray = list(descendants(self.pid)) if self.process.poll() is None else []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            deadline = time.monotonic() + 30
            try:
                os.killpg(self.pid, sig)
                while time.monotonic() < deadline:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=0.5)
                    os.killpg(self.pid, 0)  # raises once the whole group is gone
            except ProcessLookupError:
                break
        for pid in stray:  # a child that left the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def check_tree(server: Server) -> None:
    """The server's own stack must show ``service`` from ``server.tree`` (``--before``)."""
    dump = subprocess.run([PYSPY, "dump", "--full-filenames", "--pid", str(server.pid)], capture_output=True, text=True)
    files = set(re.findall(r"\((/\S+?/service/\S+?\.py):\d+\)", dump.stdout))
    if not files or not all(f.startswith(f"{server.tree}/") for f in files):
        raise RuntimeError(f"the server does not run {server.tree}'s service: {sorted(files) or dump.stderr}")


def metric_sums(url: str) -> dict[str, float]:
    """The image decode histogram's sum and count, and vLLM's processor cache hits, from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    pattern = rf"^({DECODE}_(?:sum|count)|vllm:mm_cache_hits_total)\S* (\S+)$"
    for name, value in re.findall(pattern, text, re.M):
        out[name] = out.get(name, 0.0) + float(value)
    return out


def gil_samples(raw: Path) -> Counter[tuple[int, str, bool]]:
    """(thread id, thread name, in the HF processor) -> GIL-held samples, from ``py-spy record --threads``'s raw
    file. The transformers engine calls PaliGemma's processor (the resize of the whole upload) on its model thread."""
    out: Counter[tuple[int, str, bool]] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        match = re.match(r"thread \((\d+)\)(?:: ([^;]*))?", stack)
        tid, name = (int(match.group(1)), match.group(2) or "?") if match else (0, "?")
        out[tid, name, bool(re.search(r"ProcessorMixin\.__call__|image_processing", stack))] += int(count)
    return out


def record_gil(pid: int, raw: Path) -> subprocess.Popen[bytes]:
    """Start py-spy on ``pid`` (stopped by SIGINT, which makes it write ``raw``); returns once it samples."""
    command = [PYSPY, "record", "--gil", "--idle", "--nonblocking", "--threads", "--rate", str(RATE)]
    command += ["--format", "raw", "-o", str(raw), "--pid", str(pid)]
    log = raw.with_suffix(".log")
    with open(log, "wb") as out:
        spy = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while b"Sampling process" not in log.read_bytes():
        if spy.poll() is not None:
            raise RuntimeError(f"py-spy could not attach to {pid}: {log.read_text()}")
        time.sleep(0.1)
    return spy


def measure(server: Server, row: Row, images: list[bytes], args: argparse.Namespace) -> Row:
    """One row: warm-up, then the measured closed loop with /proc snapshots and py-spy around it."""
    url = server.url + ("/detect" if row.endpoint == "detect" else "/v1/chat/completions")
    bodies = [body(row.endpoint, image, "demo") for image in images]
    warm, bodies = bodies[: args.warmup], bodies[args.warmup :]
    asyncio.run(closed_loop(url, warm, len(warm)))
    before = metric_sums(server.url)
    raw = args.scratch / f"gil-{row.code}-{row.server}-{row.endpoint}-{row.upload}.txt"
    spy = record_gil(server.pid, raw)
    try:
        start = Snapshot.take(server.pid)
        row.seconds, row.ok, errors, tokens = asyncio.run(closed_loop(url, bodies, args.concurrency))
        end = Snapshot.take(server.pid)
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        spy.wait(timeout=60)
    after = metric_sums(server.url)
    n = max(row.ok, 1)
    ms = 1000 / TICK / n
    row.errors, row.req_per_s, row.completion_tokens = dict(errors), row.ok / row.seconds, tokens / n

    # the transformers engine's model threads: lowered below the main thread by model_nice
    model_tids = {tid for tid, (_, _, nice) in end.threads.items() if nice > end.threads[server.pid][2]}
    model = sum(end.threads[t][0] - start.threads.get(t, (0, 0, 0))[0] for t in model_tids)
    process = end.procs[server.pid][0] - start.procs[server.pid][0]
    reaped = end.procs[server.pid][1] - start.procs[server.pid][1]  # children that ended in the window
    children = {p: end.procs[p][0] - start.procs.get(p, (0, 0, 0))[0] for p in end.procs if p != server.pid}
    engine = sum(t for p, t in children.items() if end.names.get(p, "").startswith("VLLM::"))
    row.api_cpu_ms = (process - model) * ms
    row.model_cpu_ms = (model + engine) * ms
    row.other_cpu_ms = (sum(children.values()) - engine + reaped) * ms
    row.threads["model threads"] = {"count": len(model_tids), "cpu_ms": model * ms}

    gil: Counter[str] = Counter()
    for (tid, name, prep), samples in gil_samples(raw).items():
        part = ("model prep" if prep else "model") if tid in model_tids or name.startswith("hf-generate") else "api"
        gil[part] += samples
        row.threads.setdefault(f"{name} ({part})", {"gil_ms": 0.0})["gil_ms"] += samples / RATE * 1000 / n
    row.gil_ms = gil["api"] / RATE * 1000 / n
    row.prep_gil_ms = gil["model prep"] / RATE * 1000 / n if model_tids else None
    log = raw.with_suffix(".log").read_text()
    row.pyspy = " ".join(re.findall(r"Samples: \d+ Errors: \d+|[\d.]+s behind in sampling", log))[-300:]

    change = {name: after[name] - before.get(name, 0.0) for name in after}
    if change.get(f"{DECODE}_count"):
        row.decode_ms = 1000 * change[f"{DECODE}_sum"] / change[f"{DECODE}_count"]
    hits = change.get("vllm:mm_cache_hits_total", 0)
    if hits:  # distinct images: there should be none
        row.errors["processor cache hits"] = int(hits)
    return row


COLUMNS = (
    "| code | server | endpoint | upload | req/s | API CPU ms/req | GIL ms/req | decode ms/req "
    "| prep GIL on model thread ms/req | other CPU ms/req | out tokens | errors |\n"
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def table(rows: list[Row]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [COLUMNS]
    for r in rows:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"
        numbers = (r.req_per_s, r.api_cpu_ms, r.gil_ms, r.decode_ms, r.prep_gil_ms, r.other_cpu_ms, r.completion_tokens)
        lines.append(
            f"| {r.code} | {r.server} | {r.endpoint} | {r.upload} | {' | '.join(map(cell, numbers))} | {errors} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="measured requests per row")
    parser.add_argument("--warmup", type=int, default=16, help="requests before each row, all at once (not measured)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated: {', '.join(SERVERS)}")
    parser.add_argument("--uploads", default=",".join(UPLOADS), help=f"comma-separated: {', '.join(UPLOADS)}")
    parser.add_argument("--before", type=Path, default=None, help="another checkout whose service runs as 'before'")
    parser.add_argument("--code", default=None, help="after,before (default: after, and before with --before)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--profiles", type=Path, default=None, help="keep py-spy's raw files and server logs here")
    args = parser.parse_args()
    servers, uploads = args.servers.split(","), args.uploads.split(",")
    codes = (args.code or ("after,before" if args.before else "after")).split(",")
    trees = {"after": ROOT, "before": args.before.resolve() if args.before else None}
    if "before" in codes and trees["before"] is None:
        parser.error("--code before needs --before DIR")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="photo-uploads-") as tmp, ExitStack() as stack:
        args.scratch = Path(args.profiles or tmp)
        args.scratch.mkdir(parents=True, exist_ok=True)
        per_row = args.warmup + args.requests
        images = {kind: make_images(kind, 2 * per_row, Path(tmp)) for kind in uploads}
        for kind, items in images.items():
            print(f"{kind}: {len(items)} images, mean {np.mean([len(i) for i in items]) / 1e3:.0f} KB", file=sys.stderr)
        runs = [(c, s) for s in servers for c in (codes if s.startswith("service-") else codes[:1])]
        for code, name in runs:
            tree = trees[code]  # vllm-serve: the first --code's tree, for the project's vLLM plugin
            assert tree is not None
            label = code if name.startswith("service-") else "-"
            server = Server(name, tree, Path(args.scratch) / f"server-{code}-{name}.log")
            stack.callback(server.close)
            started = time.monotonic()
            server.wait_ready("/health" if name == "vllm-serve" else "/readyz")
            print(f"{label} {name}: ready in {time.monotonic() - started:.0f} s ({tree})", file=sys.stderr)
            if name.startswith("service-"):
                check_tree(server)
            for e, endpoint in enumerate(ENDPOINTS[name]):
                for kind in uploads:
                    share = images[kind][e * per_row : (e + 1) * per_row]  # not the other endpoint's images
                    rows.append(row := measure(server, Row(label, name, endpoint, kind), share, args))
                    print(json.dumps(asdict(row)), file=sys.stderr, flush=True)
            server.close()
    print(f"{args.concurrency} in flight, {args.requests} requests per row, each its own image; {os.cpu_count()} CPUs")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
