"""API benchmark: the /v1 path against a direct backend call, and 8 concurrent API clients plus a UI-path caller.

Side by side in one run, on the same LLM backend object:
1. direct: `backend.chat()` on a worker thread (what the Chat tab's handler calls), greedy, a fixed prompt and
   `--new` tokens;
2. API: the same request through the openai client -> HTTP -> /v1/chat/completions (streamed SSE, and plain JSON);
   overhead per token = median API time per token - median direct time per token, over `--reps` rounds whose order
   rotates; `direct` is run twice per round (A/A) and the median |difference| is the noise floor the overhead is
   judged against (on a loaded 2-core CPU the model's own time varies far more than the API costs);
3. machinery: the same routes with a zero-cost backend (tokens cost nothing), so the API's own per-token cost
   (queue, SSE encoding, HTTP, the client's parsing) is measured alone and resolved on any machine;
4. load: `--clients` (8) threads with the openai client plus one UI-path thread calling `backend.chat()` directly,
   all at once, each `--rounds` requests; every request must be served (0 failures), with its queue wait.
The routes are the studio's own (`studio.api.mount`) on a bare FastAPI app served by uvicorn, the app Gradio serves
them on; the UI-path caller is the Chat tab's backend call without a browser.

    python -m studio.bench.api --quick             # CPU: the offline SmolLM2-135M (the whole path, ~1 min idle)
    python -m studio.bench.api                     # GPU: Llama-3.1-8B architecture, random weights, 12 GiB cap
    python -m studio.bench.api --device cpu        # dry run of the GPU mode's code on a 2-layer random Llama
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from studio.bench.common import RESULTS_DIR, Target, describe_machine, machine_info, targets_table, write_results

PROMPT = [{"role": "user", "content": "Tell me about the history of the lighthouse, in detail."}]


def build_context(root: Path, vram_cap_gb: float | None, max_queue: int) -> Any:
    from studio.app import build_context as build
    from studio.settings import Settings

    settings = Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False,
                        vram_cap_gb=vram_cap_gb, api_max_queue=max_queue)  # fmt: skip
    return build(settings)


def random_llama_folder(folder: Path, arch: dict | None = None, device: str = "cuda") -> str:
    """A Llama-3.1-8B-architecture checkpoint with random weights and a small trained BPE tokenizer (GPU mode).

    Speed does not depend on the weights' values; the head keeps its 128,256 rows, those past the tokenizer's
    vocabulary zeroed, so greedy decoding yields text and the SSE path streams a chunk per token as for a real
    model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from studio.bench.llm_models import LLAMA_8B

    if (folder / "config.json").is_file():
        return folder.name
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    words = "the lighthouse keeper kept a lamp burning on the rocky coast for ships at night " * 200
    bpe.train_from_iterator([words], trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}<s>assistant: "
    config = LlamaConfig(**{**(arch or LLAMA_8B), "bos_token_id": 1, "eos_token_id": 2})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # full-size head, but greedy picks tokens the small tokenizer can decode
        model.lm_head.weight[len(tok) :] = 0
        model.lm_head.weight[: len(tok)].normal_(0, 0.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder.name


def serve(ctx: Any) -> tuple[str, Any]:
    import uvicorn
    from fastapi import FastAPI

    from studio import api
    from studio.bench.startup import free_port

    app = FastAPI()
    api.mount(app, ctx)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}/v1", server


def direct(backend: Any, model: str, new: int) -> tuple[float, int]:
    """The backend call on a worker thread, as Gradio runs the Chat tab's handler (on this 2-core CPU torch ran
    8x slower on the main thread than on any other, so the main thread would flatter the API)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["r"] = _direct(backend, model, new)
        except Exception as e:
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["r"]


def _direct(backend: Any, model: str, new: int) -> tuple[float, int]:
    from backends.llm import GenerationOptions

    opts = GenerationOptions(temperature=0.0, max_new_tokens=new)
    t0 = time.perf_counter()
    final = None
    for u in backend.chat(PROMPT, opts, model=model):
        final = u
    return time.perf_counter() - t0, final.stats.new_tokens


def through_api(client: Any, model: str, new: int, stream: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    if stream:
        tokens = 0
        for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=new, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):  # fmt: skip
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    else:
        tokens = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=new, temperature=0)
        tokens = tokens.usage.completion_tokens
    return time.perf_counter() - t0, tokens


def overhead(backend: Any, client: Any, model: str, new: int, reps: int, deadline: float = float("inf")) -> dict:
    """Per-token time of each path over `reps` rounds, the order rotated each round (so a slow spell of the
    machine hits every path alike); medians are the figures. The noise floor is the A/A difference: `direct` and
    `direct_again` are the same call, so the median of |direct - direct_again| per token is what this machine's
    noise alone makes of two identical paths; an overhead below it is not resolved."""
    paths = {
        "direct": lambda: direct(backend, model, new),
        "direct_again": lambda: direct(backend, model, new),
        "api_stream": lambda: through_api(client, model, new, True),
        "api_json": lambda: through_api(client, model, new, False),
    }
    names = list(paths)
    per: dict[str, list[float]] = {n: [] for n in names}
    direct(backend, model, 2)  # warm: load the model, build the decoder
    through_api(client, model, 2, True)
    for i in range(reps):
        if i >= 2 and time.monotonic() > deadline:  # keep the load run inside the time the GPU call has
            print(f"overhead: stopped after {i} rounds (time budget)", flush=True)
            break
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t, n = paths[name]()
            per[name].append(t / max(1, n))
    med = {n: statistics.median(v) for n, v in per.items()}
    floor = statistics.median(abs(a - b) for a, b in zip(per["direct"], per["direct_again"], strict=True))
    out: dict[str, Any] = {n: {"median_s_per_token": med[n], "best_s_per_token": min(per[n]),
                               "s_per_token": per[n]} for n in names}  # fmt: skip
    out["noise_floor_ms_per_token"] = 1000 * floor
    for name in ("api_stream", "api_json"):
        over = 1000 * (med[name] - med["direct"])
        out[name]["overhead_ms_per_token"] = over
        out[name]["resolved"] = over > 1000 * floor  # a positive overhead beyond what noise alone makes
    return out


class ZeroCostLLM:
    """A chat backend whose tokens cost nothing (one word per update, no model): through the API, all the time
    is the API path's own (HTTP, queue, SSE encoding, the openai client's parsing)."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def chat(self, messages, options, *, cancel=None, model=None, tools=None, tool_choice="auto", reply_prefix=""):
        from backends.llm import ChatUpdate, GenerationStats

        n = options.max_new_tokens
        text = ""
        for _ in range(n):
            if cancel is not None and cancel.is_set():
                break
            text += " w"
            yield ChatUpdate(text, " w")
        yield ChatUpdate(text, done=True, stats=GenerationStats(prompt_tokens=8, new_tokens=n, finish_reason="length"))


def machinery(root: Path, new: int, reps: int) -> dict[str, Any]:
    """The API path's own cost per token, measured with the zero-cost backend (resolvable on any machine)."""
    import openai

    from backends.llm import GenerationOptions

    ctx = build_context(root / "machinery", None, max_queue=4)
    fake = ZeroCostLLM(ctx.backends.llm.config)
    ctx.backends._built["llm"] = fake
    url, server = serve(ctx)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    model = "smollm2-135m"
    times: dict[str, list[float]] = {"direct": [], "api_stream": [], "api_json": []}
    try:
        through_api(client, model, 4, True)
        for _ in range(reps):
            t0 = time.perf_counter()
            for _u in fake.chat(PROMPT, GenerationOptions(temperature=0.0, max_new_tokens=new)):
                pass
            times["direct"].append((time.perf_counter() - t0) / new)
            for name, stream in (("api_stream", True), ("api_json", False)):
                t, n = through_api(client, model, new, stream)
                times[name].append(t / max(1, n))
    finally:
        server.should_exit = True
        ctx.jobs.shutdown(timeout=10)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"tokens": new, "reps": reps, **{f"{k}_us_per_token": 1e6 * v for k, v in med.items()},
            "stream_overhead_ms_per_token": 1000 * (med["api_stream"] - med["direct"]),
            "json_overhead_ms_per_token": 1000 * (med["api_json"] - med["direct"])}  # fmt: skip


def load(backend: Any, url: str, key: str, model: str, clients: int, rounds: int, new: int) -> dict[str, Any]:
    import openai

    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def api_client(i: int) -> None:
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=1800)
        for _ in range(rounds):
            t0 = time.perf_counter()
            try:
                r = c.chat.completions.create(model=model, messages=PROMPT, max_tokens=new, temperature=0)
                ok, err = r.usage.completion_tokens > 0, ""
            except Exception as e:  # counted as a failure; the run goes on
                ok, err = False, f"{type(e).__name__}: {e}"[:200]
            with lock:
                results.append({"who": f"api-{i}", "ok": ok, "s": time.perf_counter() - t0, "error": err})

    def ui_caller() -> None:
        for _ in range(rounds):
            t0 = time.perf_counter()
            try:
                ok, err = _direct(backend, model, new)[1] > 0, ""
            except Exception as e:
                ok, err = False, f"{type(e).__name__}: {e}"[:200]
            with lock:
                results.append({"who": "ui", "ok": ok, "s": time.perf_counter() - t0, "error": err})

    threads = [threading.Thread(target=api_client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=ui_caller))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies = sorted(r["s"] for r in results)
    return {
        "requests": len(results), "served": sum(r["ok"] for r in results), "wall_s": wall,
        "latency_p50_s": statistics.median(latencies), "latency_max_s": latencies[-1],
        "ui_served": sum(r["ok"] for r in results if r["who"] == "ui"),
        "errors": [r["error"] for r in results if not r["ok"]][:10],
    }  # fmt: skip


TINY_LLAMA = {"vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}  # fmt: skip


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import openai

    t_start = time.monotonic()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-api-"))
    gpu = args.device == "cuda"
    cap = args.vram_cap_gb if gpu else None
    if args.quick:
        model = "smollm2-135m"
    else:  # GPU: the 8B architecture; --device cpu: the same code on a 2-layer model (a dry run of the GPU mode)
        model = random_llama_folder(root / "models" / ("bench-llama-8b-random" if gpu else "bench-llama-tiny-random"),
                                    None if gpu else TINY_LLAMA, args.device)  # fmt: skip
        print(f"built {model}", flush=True)
    if gpu:  # the 12 GiB wall goes up after the checkpoint was written (built on the GPU in bf16)
        import torch

        torch.cuda.set_per_process_memory_fraction(
            args.vram_cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory
        )
    mach = machinery(root, args.machinery_new, args.machinery_reps)
    print("API machinery per token:", {k: round(v, 3) for k, v in mach.items()}, flush=True)
    ctx = build_context(root, cap, max_queue=args.clients + 2)
    backend = ctx.backends.llm
    backend.configure(model_id=model)
    url, server = serve(ctx)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800)
    try:
        deadline = t_start + args.budget_s / 2  # half the budget for the overhead rounds, the rest for the load
        per_token = overhead(backend, client, model, args.new, args.reps, deadline)
        print("per token:", {k: v.get("median_s_per_token", v) if isinstance(v, dict) else v
                             for k, v in per_token.items()}, flush=True)  # fmt: skip
        loaded = load(backend, url, "none", model, args.clients, args.rounds, args.load_new)
        print("load:", loaded, flush=True)
    finally:
        server.should_exit = True
    waits = [r["wait_s"] for r in ctx.api.snapshot()["recent"] if r["status"] == "ok"]
    direct_ms = 1000 * per_token["direct"]["median_s_per_token"]
    stream_ms = per_token["api_stream"]["overhead_ms_per_token"]
    targets = [
        Target(f"requests served under load ({args.clients} API clients + UI)", loaded["served"] / loaded["requests"],
               1.0, "fraction"),
        Target("failures under load", loaded["requests"] - loaded["served"], 0, "requests", higher_is_better=False),
        Target("API machinery overhead per token (streamed, zero-cost backend)", mach["stream_overhead_ms_per_token"],
               1.0, "ms/token", higher_is_better=False),
        Target("API overhead per token over a direct call, real model (streamed, median)", stream_ms,
               max(1.0, per_token["noise_floor_ms_per_token"]), "ms/token", higher_is_better=False),
        Target("API overhead per token / direct per-token time (streamed, median)", stream_ms / direct_ms, 0.05,
               "ratio", higher_is_better=False),
    ]  # fmt: skip
    mode = (
        "quick (CPU)" if args.quick else f"GPU, {args.vram_cap_gb} GiB cap" if gpu else "dry run of the GPU mode (CPU)"
    )
    return {
        "machine": machine_info("torch", "transformers", "fastapi", "uvicorn", "openai"),
        "model": model, "mode": mode, "clients": args.clients,
        "new_tokens": args.new, "reps": len(per_token["direct"]["s_per_token"]), "per_token": per_token, "machinery": mach, "load": loaded,
        "queue_wait_s": {"p50": statistics.median(waits) if waits else None, "max": max(waits, default=None)},
        "targets": [t.as_dict() for t in targets],
    }  # fmt: skip


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def markdown(r: dict[str, Any]) -> str:
    p, ld, m = r["per_token"], r["load"], r["machinery"]
    rows = ["| path | ms/token (median) | ms/token (best) | overhead ms/token (median) | above the noise floor |",
            "|---|---|---|---|---|"]  # fmt: skip
    for name in ("direct", "direct_again", "api_stream", "api_json"):
        over = f"{p[name]['overhead_ms_per_token']:+.2f}" if "overhead_ms_per_token" in p[name] else "-"
        res = ("yes" if p[name]["resolved"] else "no") if "resolved" in p[name] else "-"
        med, best = 1000 * p[name]["median_s_per_token"], 1000 * p[name]["best_s_per_token"]
        rows.append(f"| {name} | {med:.2f} | {best:.2f} | {over} | {res} |")
    return "\n".join([
        f"# API benchmark ({r['mode']}, {r['model']})", "", describe_machine(r["machine"]), "",
        f"Command: `{r['machine']['command']}` · {r['new_tokens']} new tokens, {r['reps']} rounds, the order of the "
        "paths rotated each round; `direct_again` repeats `direct` (A/A) to give the noise floor.", "", *rows, "",
        f"Noise floor (median |direct - direct_again| per token): {p['noise_floor_ms_per_token']:.2f} ms/token.", "",
        f"API machinery alone (a zero-cost backend: every second is the API's), {m['tokens']} tokens x {m['reps']}: "
        f"direct {m['direct_us_per_token']:.1f} us/token, streamed {m['api_stream_us_per_token']:.1f} us/token, "
        f"JSON {m['api_json_us_per_token']:.1f} us/token: overhead {m['stream_overhead_ms_per_token']:.3f} ms/token "
        f"streamed, {m['json_overhead_ms_per_token']:.3f} ms/token JSON.", "",
        f"Load: {ld['requests']} requests from {r['clients']} API clients + 1 UI-path caller, {ld['served']} served "
        f"({ld['ui_served']} of them UI) in {ld['wall_s']:.1f} s; latency p50 {ld['latency_p50_s']:.1f} s, "
        f"max {ld['latency_max_s']:.1f} s; API queue wait p50 {_s(r['queue_wait_s']['p50'])}, "
        f"max {_s(r['queue_wait_s']['max'])}.",
        "", targets_table(r["targets"]),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU, the offline SmolLM2-135M, short requests")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="GPU mode's device; cpu: a dry run of the GPU mode on a 2-layer random Llama")  # fmt: skip
    p.add_argument("--new", type=int, default=None, help="new tokens per overhead request (64; quick 16)")
    p.add_argument("--reps", type=int, default=None, help="rounds of the overhead paths (4; quick 8)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=None, help="requests per load client (2; quick 1)")
    p.add_argument("--load-new", type=int, default=None, help="new tokens per load request (32; quick 6)")
    p.add_argument("--machinery-new", type=int, default=256, help="tokens per zero-cost request")
    p.add_argument("--machinery-reps", type=int, default=15)
    p.add_argument("--vram-cap-gb", type=float, default=12.0)
    p.add_argument("--budget-s", type=float, default=None, help="overhead rounds stop at half of it (80; quick 900)")
    p.add_argument("--workdir", type=Path, default=None, help="data and models folder (default: a temp folder)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    quick = args.quick
    if quick:
        args.device = "cpu"
    args.new = args.new or (16 if quick else 64)
    args.reps = args.reps or (8 if quick else 4)
    args.budget_s = args.budget_s or (900.0 if quick else 80.0)
    args.rounds = args.rounds or (1 if quick else 2)
    args.load_new = args.load_new or (6 if quick else 32)
    result = bench(args)
    text = markdown(result)
    print(text)
    if args.device == "cuda" or quick:  # a dry run checks the code; its figures are not results
        write_results(args.out, "api", result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
