"""Residency under real load: concurrent callers, four model families over the budget, a neighbour process taking
memory mid-run and a training job on a preemptible lease throughout. Not a timed test: a benchmark.

Phases, side by side in one run:
  A. the trainer alone, plain (no lease): steps/s;
  B. the same trainer under the preemptible training lease, nothing else running: steps/s (lease overhead);
  C. stress: the trainer on its lease in a thread for the whole run, `--callers` threads each sending `--requests`
     random requests over the four families (studio/bench/residency_families.py, real forward passes), another
     program taking `--neighbour-gb` from 30% to 70% of the run. Every output is compared with the first run's
     (exact); a request's wait is the time from asking to holding the model, less its own swap-in/load.
Targets: 0 failed requests; 0 wrong outputs; swap-in >= 85% of the raw pinned host->device bandwidth measured in
the same run (median over the swap-ins of models >= 0.5 GB; all of them with --quick); p95 wait of an interactive
request while training runs <= 1 s plus its own swap-in; training throughput B/A >= 95%.

    python -m studio.bench.residency_stress                 # GPU: H200 capped to 12 GiB (GPU.md)
    python -m studio.bench.residency_stress --quick         # CPU, simulated card, tiny models (< 1 min)
Results: studio/bench/results/residency-stress-<device>.json and .md (written atomically, named after the GPU).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from studio.bench.common import RESULTS_DIR, Target, describe_machine, machine_info, quantile, targets_table
from studio.bench.residency import Env, digest, raw_bandwidth
from studio.bench.residency_families import prepare
from studio.bench.residency_trace import Neighbour
from studio.offline import OFFLINE_ENV, QUIET_ENV

log = logging.getLogger("studio.bench.residency_stress")
GiB, MiB = 2**30, 2**20
RANDOM_FNS = ("randn", "randint", "rand")


# ---- reproducible requests: each family's random inputs are recorded once, then replayed per thread -------------
class Tape:
    """Monkeypatches torch.randn/randint/rand: a thread with a tape records (first run) or replays (later runs) its
    random inputs, so every request of a family sees exactly the same inputs whatever thread runs it; threads
    without a tape (the trainer) get the real functions."""

    local = threading.local()
    originals: ClassVar[dict[str, Any]] = {}

    @classmethod
    def install(cls) -> None:
        for name in RANDOM_FNS:
            if name not in cls.originals:
                cls.originals[name] = getattr(torch, name)
                setattr(torch, name, cls._patched(name))

    @classmethod
    def uninstall(cls) -> None:
        for name, fn in cls.originals.items():
            setattr(torch, name, fn)
        cls.originals.clear()

    @classmethod
    def _patched(cls, name: str):
        def fn(*args, **kwargs):
            tape = getattr(cls.local, "tape", None)
            if tape is None:
                return cls.originals[name](*args, **kwargs)
            if tape["recording"]:
                t = cls.originals[name](*args, **kwargs)
                tape["items"].append(t.detach().to("cpu", copy=True))
                return t
            item = tape["items"][tape["i"]]
            tape["i"] += 1
            return item.to(kwargs.get("device") or "cpu", kwargs.get("dtype") or item.dtype)

        return fn


def capture(fam: Any, model: Any, tape: dict) -> torch.Tensor:
    """One request; digest = sums of the first weights + the last tensor a module of THIS thread produced."""
    me, last = threading.get_ident(), []

    def keep(mod: Any, inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and threading.get_ident() == me:
            last[:] = [out]

    hook = torch.nn.modules.module.register_module_forward_hook(keep)
    Tape.local.tape = tape
    tape["i"] = 0
    try:
        fam.request(model)
    finally:
        Tape.local.tape = None
        hook.remove()
    return digest(model, last[0] if last else None)


# ---- the trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """An MLP stack trained with AdamW on fixed-seed batches (its own generator: no global RNG, no dropout)."""

    def __init__(self, device: str, width: int, blocks: int, batch: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
        self.model = nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        self.model.to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device, self.width, self.batch = device, width, batch
        self.state_bytes = 4 * sum(p.numel() for p in self.model.parameters()) * 4  # weights, grads, 2x Adam

    def step(self) -> float:
        x = torch.randn((self.batch, self.width), generator=self.gen, device=self.device)
        loss = (self.model(x) - x).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


def sync(env: Env) -> None:
    env.sync()


def throughput(env: Env, trainer: Trainer, steps: int, lease: Any = None) -> float:
    trainer.step()  # warm
    sync(env)
    t0 = time.perf_counter()
    for _ in range(steps):
        if lease is None:
            trainer.step()
        else:
            with lease.step():
                trainer.step()
    sync(env)
    return steps / (time.perf_counter() - t0)


def lease_overhead(env: Env, trainer: Trainer, steps: int, rounds: int = 3) -> tuple[float, float]:
    """Phases A and B, alternated `rounds` times (A B A B ...) so that drift in clocks or load hits both alike;
    the medians of each."""
    plain, leased = [], []
    m = env.manager()
    for _ in range(rounds):
        plain.append(throughput(env, trainer, steps))
        with m.training("train:alone", modules=[trainer.model], optimizers=[trainer.opt], label="alone") as lease:
            leased.append(throughput(env, trainer, steps, lease))
    m.close()
    return quantile(plain, 0.5), quantile(leased, 0.5)


# ---- phase C ----------------------------------------------------------------------------------------------------
class Stress:
    def __init__(self, env: Env, args: argparse.Namespace, families: dict, loaders: dict) -> None:
        self.env, self.args, self.families = env, args, families
        self.m = env.manager(monitor=True)
        for loader in loaders.values():
            self.m.register(loader)
        self.tapes = {k: {"recording": True, "items": [], "i": 0} for k in families}
        self.reference: dict[str, torch.Tensor] = {}
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.done = 0
        self.total = args.callers * args.requests
        self.neighbour: Neighbour | None = None
        self.neighbour_on = False

    def references(self) -> None:
        for name, fam in self.families.items():
            self.reference[name] = self.m.run(name, lambda model, fam=fam, name=name: capture(fam, model,
                                              self.tapes[name]), working_bytes=fam.working_hint)  # fmt: skip
            self.tapes[name]["recording"] = False

    def request(self, name: str) -> None:
        fam, t0, ready, held = self.families[name], time.perf_counter(), [], []  # held: wall times of the lease

        def fn(model: Any) -> torch.Tensor:
            ready.append(time.perf_counter())
            held.append(time.time())
            try:
                return capture(fam, model, dict(self.tapes[name], i=0))
            finally:
                held.append(time.time())

        wall0, beside = time.time(), self.neighbour_on  # another program held memory when it was asked
        try:
            digest = self.m.run(name, fn, working_bytes=fam.working_hint)
        except Exception as e:
            with self.lock:
                self.failures.append(f"{name}: {type(e).__name__}: {e}")
            return
        own = sum(
            e.seconds for e in self.m.snapshot().events
            if e.key == name and e.kind in ("swap_in", "load") and wall0 <= e.time <= time.time()
        )  # fmt: skip
        wait = (ready[0] if ready else time.perf_counter()) - t0
        row = {"key": name, "wait_s": wait, "own_move_s": own, "excess_s": max(0.0, wait - own),
               "correct": bool(torch.equal(digest, self.reference[name])), "done_s": time.perf_counter() - t0,
               "beside_neighbour": beside or self.neighbour_on, "held": held}  # fmt: skip
        with self.lock:
            self.rows.append(row)
            self.done += 1
            self._neighbour_step()

    def _neighbour_step(self) -> None:
        if self.neighbour is None:
            return
        if self.done == int(0.3 * self.total):
            self.neighbour_on = True
            threading.Thread(target=self.neighbour.take, args=(self.nb_bytes,), daemon=True).start()
        elif self.done == int(0.7 * self.total):
            threading.Thread(target=self._neighbour_off, daemon=True).start()

    def _neighbour_off(self) -> None:
        self.neighbour.take(0)
        self.neighbour_on = False

    def caller(self, seed: int) -> None:
        rng, names = random.Random(seed), list(self.families)
        for _ in range(self.args.requests):
            self.request(rng.choice(names))
            time.sleep(rng.random() * self.args.think_s)

    def run(self, trainer: Trainer, neighbour: Neighbour | None, nb_bytes: int) -> dict:
        self.neighbour, self.nb_bytes = neighbour, nb_bytes
        self.references()
        stop, train = threading.Event(), {"steps": 0}

        def train_loop() -> None:
            with self.m.training("train:stress", modules=[trainer.model], optimizers=[trainer.opt],
                                 label="Fine-tune") as lease:  # fmt: skip
                train["lease"] = lease
                t0 = time.perf_counter()
                while not stop.is_set():
                    with lease.step():
                        trainer.step()
                    train["steps"] += 1
                sync(self.env)
                train["seconds"] = time.perf_counter() - t0

        t = threading.Thread(target=train_loop, name="trainer")
        t.start()
        callers = [threading.Thread(target=self.caller, args=(i,)) for i in range(self.args.callers)]
        t0 = time.perf_counter()
        for c in callers:
            c.start()
        for c in callers:
            c.join()
        wall = time.perf_counter() - t0
        stop.set()
        t.join()
        lease = train["lease"]
        snap = self.m.snapshot()
        self.context = self.m.context_figures()
        self.m.close()
        return self._summary(wall, train, lease, snap)

    def _summary(self, wall: float, train: dict, lease: Any, snap: Any) -> dict:
        # The wait target is about training sharing the card: requests made while the other program held memory
        # wait for it (a 4-bit model does not run on the CPU) and are reported on their own.
        excess = [r["excess_s"] for r in self.rows if not r["beside_neighbour"]]
        beside = [r["wait_s"] for r in self.rows if r["beside_neighbour"]]
        swaps = [e for e in snap.events if e.kind == "swap_in" and e.seconds > 0]
        big = [e for e in swaps if e.bytes >= (0 if self.env.quick else GiB // 2)]
        # a swap-in while another request ran on the card (its kernels share the default stream with the copy)
        busy = [any(r["key"] != e.key and len(r["held"]) == 2 and r["held"][0] < e.time and
                    r["held"][1] > e.time - e.seconds for r in self.rows) for e in big]  # fmt: skip
        return {
            "wall_s": wall, "requests": len(self.rows) + len(self.failures), "failed": len(self.failures),
            "failures": self.failures[:20], "wrong_outputs": sum(not r["correct"] for r in self.rows),
            "wait_p50_s": quantile([r["wait_s"] for r in self.rows], 0.5),
            "wait_p95_s": quantile([r["wait_s"] for r in self.rows], 0.95),
            "excess_wait_p50_s": quantile(excess, 0.5), "excess_wait_p95_s": quantile(excess, 0.95),
            "beside_neighbour": {"requests": len(beside), "wait_p95_s": quantile(beside, 0.95, None),
                                 "wait_max_s": max(beside, default=None)},
            "swap_in_gbps": [e.bytes / e.seconds / 1e9 for e in big],
            "swap_in_beside_request": busy,
            "training": {"steps": train["steps"], "seconds": train.get("seconds"), "pauses": lease.pauses,
                         "paused_s": lease.paused_s},
            "counters": snap.metrics.counters, "context": self.context, "rows": self.rows,
            # what each family's leases set aside: the caller's hint and the largest working peak measured
            "working": {v.key: {"hint_bytes": self.families[v.key].working_hint, "peak_bytes": v.working_peak}
                        for v in snap.models if v.key in self.families},
        }  # fmt: skip


# ---- main -------------------------------------------------------------------------------------------------------
def bench(args: argparse.Namespace) -> dict:
    env = Env(args)
    Tape.install()
    neighbour = None
    try:
        neighbour = Neighbour(env)
        bw = raw_bandwidth(env, GiB if env.cuda else 8 * MiB)
        families, loaders, errors = prepare(env.device, env.quick, Path(args.work))
        width, blocks, batch = (128, 2, 32) if env.quick else (args.train_width, args.train_blocks, 64)
        trainer = Trainer(env.device, width, blocks, batch)
        plain, leased = lease_overhead(env, trainer, args.train_steps)
        if not neighbour.wait_ready():
            errors["neighbour"] = "the second CUDA process did not start"
        nb = int(args.neighbour_gb * GiB) if env.cuda else 6 * MiB
        stress = Stress(env, args, families, loaders).run(trainer, neighbour, nb)
    finally:
        Tape.uninstall()
        if neighbour is not None:
            neighbour.close()
    raw = bw["pinned_h2d_gbps"]
    swap_fraction = quantile(stress["swap_in_gbps"], 0.5, None)
    swap_fraction = swap_fraction / raw if swap_fraction and raw else None
    budget = env.manager().capacity_bytes()
    targets = [
        Target("failed requests", stress["failed"], 0, "requests", higher_is_better=False),
        Target("wrong outputs", stress["wrong_outputs"], 0, "requests", higher_is_better=False),
        Target("swap-in / raw pinned bandwidth (median)", swap_fraction, 0.85, "ratio"),
        Target(
            "p95 wait while training, less own swap-in (other program idle)",
            stress["excess_wait_p95_s"],
            1.0,
            "s",
            higher_is_better=False,
        ),
        Target("training throughput, lease / plain", leased / plain if plain else None, 0.95, "ratio"),
    ]
    return {
        "machine": machine_info("torch", "transformers", "bitsandbytes", "diffusers", "ultralytics"),
        "quick": env.quick, "cap_bytes": env.cap, "budget_bytes": budget,
        "families_bytes": {k: f.bytes for k, f in families.items()}, "trainer_state_bytes": trainer.state_bytes,
        "neighbour_bytes": nb, "bandwidth": bw, "errors": errors,
        "training_steps_per_s": {"plain": plain, "leased_alone": leased}, "stress": stress,
        "targets": [t.as_dict() for t in targets],
    }  # fmt: skip


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _split(s: dict) -> str:
    """Median swap-in bandwidth with and without another request running on the card at the same time."""
    gbps, beside = s["swap_in_gbps"], s.get("swap_in_beside_request", [])
    parts = []
    for label, flag in (("beside another request", True), ("card otherwise idle", False)):
        xs = [g for g, b in zip(gbps, beside, strict=False) if b == flag]
        parts.append(f"{label}: {len(xs)}, median {_s(quantile(xs, 0.5, None))} GB/s")
    return "; ".join(parts)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def markdown(r: dict) -> str:
    s, fam = r["stress"], r["families_bytes"]
    over = sum(fam.values()) + r["trainer_state_bytes"]
    lines = [
        "# Residency stress benchmark", "", describe_machine(r["machine"]), "",
        f"{r['machine'].get('date')}; command: `{r['machine']['command']}`", "",
        f"Families {', '.join(f'{k} {v / GiB:.2f} GB' for k, v in fam.items())} + trainer state "
        f"{r['trainer_state_bytes'] / GiB:.2f} GB = {over / GiB:.2f} GB against a budget of "
        f"{r['budget_bytes'] / GiB:.2f} GB; neighbour {r['neighbour_bytes'] / GiB:.2f} GB mid-run.", "",
        targets_table(r["targets"]), "",
        f"{s['requests']} requests from {len(set(x['key'] for x in s['rows']))} families in {s['wall_s']:.1f} s; "
        f"wait p50 {s['wait_p50_s']:.3f} s, p95 {s['wait_p95_s']:.3f} s (less own move: p95 "
        f"{s['excess_wait_p95_s']:.3f} s, requests made while the other program held memory left out: "
        f"{s['beside_neighbour']['requests']} of them, wait p95 {_s(s['beside_neighbour']['wait_p95_s'])} s, max "
        f"{_s(s['beside_neighbour']['wait_max_s'])} s). Training: {s['training']['steps']} steps, paused "
        f"{s['training']['pauses']}x for {s['training']['paused_s']:.2f} s; steps/s plain "
        f"{r['training_steps_per_s']['plain']:.2f}, on its lease alone {r['training_steps_per_s']['leased_alone']:.2f}.",
        f"Raw pinned host->device {r['bandwidth']['pinned_h2d_gbps']:.1f} GB/s (pinned buffer: "
        f"{r['bandwidth']['pinned']}); swap-ins measured: {len(s['swap_in_gbps'])} ({_split(s)}). "
        f"CPU fallbacks: {s['counters'].get('cpu_fallbacks', 0)}; our CUDA context as gauged "
        f"{_gb(s['context']['context_bytes'])} GB (largest single reading {_gb(s['context']['raw_max_bytes'])} GB, "
        f"{s['context']['rejected_readings']} readings straddled by a move).",
        "Working memory per request, largest measured peak (caller's hint) in GB: " + ", ".join(
            f"{k} {_gb(w['peak_bytes'])} ({_gb(w['hint_bytes'])})" for k, w in s.get("working", {}).items()) + ".",
    ]  # fmt: skip
    if r["errors"]:
        lines += ["", f"Errors: {r['errors']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models on a simulated card (CPU)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--work", default="/tmp/residency-stress", help="where the disk tier's files go")
    p.add_argument("--cap-gb", type=float, default=12.0)
    p.add_argument("--reserve-gb", type=float, default=0.8)
    p.add_argument("--callers", type=int, default=3)
    p.add_argument("--requests", type=int, default=40, help="per caller")
    p.add_argument("--think-s", type=float, default=0.2, help="up to this long between a caller's requests")
    p.add_argument("--train-steps", type=int, default=30, help="steps timed for the throughput phases A and B")
    p.add_argument("--train-width", type=int, default=2048)
    p.add_argument("--train-blocks", type=int, default=6)
    p.add_argument("--neighbour-gb", type=float, default=2.5)
    p.add_argument("--deadline-s", type=float, default=1800.0)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.think_s, args.train_steps = min(args.requests, 6), 0.0, min(args.train_steps, 10)
    for k, v in {**QUIET_ENV, **OFFLINE_ENV, "YOLO_CONFIG_DIR": f"{args.work}/ultralytics"}.items():
        os.environ.setdefault(k, v)  # before ultralytics/transformers are imported: nothing may touch the network
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = bench(args)
    from studio.bench.common import write_results

    result["machine"]["command"] = " ".join(["python -m studio.bench.residency_stress", *(argv or sys.argv[1:])])
    text = markdown(result)
    name = "residency-stress-quick" if args.quick else "residency-stress"
    write_results(args.out, name, {k: v for k, v in result.items()}, text)
    print(text)
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
