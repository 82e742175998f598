"""The residency planner's pure functions on synthetic records: no threads, no torch tensors, no card."""

from __future__ import annotations

from types import SimpleNamespace

from studio.residency import planner
from studio.residency.eviction import GreedyDualSize
from studio.residency.planner import Action, CpuFallback, Hit, Place, Refuse, Wait, World
from studio.residency.probes import CardReading, ContextGauge, ProcessUse
from studio.residency.state import DISK, GPU, RAM, ModelRecord

MiB = 2**20


def rec(key: str, mib: int, tier=GPU, leases: int = 0, owners=(), pool_mib: int = 0, **kw) -> ModelRecord:
    r = ModelRecord(key, loader=None, estimate=mib * MiB, custom=False, tier=tier, bytes=mib * MiB, **kw)
    r.leases, r.owners = leases, list(owners)
    if pool_mib:
        r.pool = SimpleNamespace(nbytes=pool_mib * MiB, pinned=True, reuses=0)
    return r


def world(records, capacity_mib=100, extra_mib=0, ram_cap_mib=1000, has_gpu=True) -> World:
    return World(records, capacity_mib * MiB, extra_mib * MiB, has_gpu, ram_cap_mib * MiB, 0, GreedyDualSize(), 0.0)


def test_budget_subtracts_others_cap_reserve_and_context():
    reading = CardReading("card", 1000, 600, 400, (ProcessUse(1, "game", 300), ProcessUse(7, "us", 300)), True)
    b = planner.budget(reading, has_gpu=True, card_total=0, reserved=250, vram_cap=None, reserve=50, pid=7)
    assert (b.others, b.context, b.capacity) == (300, 50, 1000 - 300 - 50 - 50)
    capped = planner.budget(reading, has_gpu=True, card_total=0, reserved=250, vram_cap=400, reserve=50, pid=7)
    assert capped.capacity == 400 - 50 - 50
    assert planner.budget(None, has_gpu=False, card_total=0, reserved=0, vram_cap=None, reserve=0).capacity == 0


def test_gauged_context_replaces_a_reading_that_raced_a_move():
    # NVML still shows 700 of ours after PyTorch already gave 400 back: one reading says the context is 450
    reading = CardReading("card", 1000, 700, 300, (ProcessUse(7, "us", 700),), True)
    racing = planner.budget(reading, has_gpu=True, card_total=0, reserved=250, vram_cap=None, reserve=0, pid=7)
    gauged = planner.budget(reading, has_gpu=True, card_total=0, reserved=250, vram_cap=None, reserve=0, pid=7,
                            context=50)  # fmt: skip
    assert (racing.context, gauged.context) == (450, 50) and gauged.capacity == racing.capacity + 400


def test_context_gauge_drops_straddled_readings_and_forgets_transients():
    now = [0.0]
    g = ContextGauge(window_s=10, clock=lambda: now[0])

    def read(own: int) -> CardReading:
        return CardReading("card", 1000, own, 1000 - own, (ProcessUse(7, "us", own),), True)

    assert g.value is None
    g.observe(read(300), 7, 250, 250)
    assert g.value == 50
    g.observe(read(900), 7, 650, 250)  # a move straddled the NVML call: not a sample
    assert (g.value, g.rejected) == (50, 1)
    now[0] = 5
    g.observe(read(700), 7, 250, 250)  # a transient 450: the smallest of the window still wins
    assert g.value == 50 and g.raw_max == 450
    now[0] = 16
    g.observe(read(650), 7, 250, 250)  # memory outside PyTorch that lasted the window now counts
    assert g.value == 400
    g.observe(read(300), 7, 250, 250)
    assert g.value == 50
    g.observe(CardReading("card", 1000, 300, 700, (), False), 7, 250, 250)  # no per-process figures: ignored
    assert g.value == 50


def test_decide_hit_place_wait_refuse_cpu():
    a, b = rec("m:a", 40), rec("m:b", 40, tier=DISK)
    assert planner.decide(world([a, b]), a, 0) == Hit(0)
    d = planner.decide(world([a, b]), b, 0)
    assert isinstance(d, Place) and d.plan.action == Action.LOAD_GPU and d.plan.gpu_victims == []

    c = rec("m:c", 70, tier=RAM)
    d = planner.decide(world([a, c]), c, 0)  # a is idle: it makes room
    assert isinstance(d, Place) and d.plan.action == Action.UP and d.plan.gpu_victims == [a]

    leased = rec("m:a", 40, leases=1, owners=[5])
    d = planner.decide(world([leased, c]), c, 0)
    assert isinstance(d, Wait) and d.blockers == (leased,) and d.need == 10 * MiB
    assert planner.decide(world([leased, c]), c, 0, held=frozenset({5})) == Refuse(("m:a",))

    huge = rec("m:h", 150, tier=RAM)
    assert planner.decide(world([huge]), huge, 0) == CpuFallback(0)
    huge.gpu_only = True  # 4-bit bitsandbytes weights: wait for other programs rather than run on the CPU
    assert planner.decide(world([huge]), huge, 0) == Wait(50 * MiB)


def test_decide_asks_training_to_yield_before_refusing_or_waiting_forever():
    trainer = SimpleNamespace(label="Fine-tune", gpu_bytes=lambda: 50 * MiB)
    c = rec("m:c", 70, tier=RAM)
    d = planner.decide(world([c], extra_mib=50), c, 0, yieldable=[trainer])
    assert isinstance(d, Wait) and d.trainers == (trainer,)
    own = planner.decide(world([c], extra_mib=50), c, 0, own_trainers=[trainer])
    assert own == Refuse(("Fine-tune",))  # the trainer's own request: it would wait for itself


def test_offload_keeps_the_ram_cap():
    a, b = rec("m:a", 40), rec("m:b", 40)
    plan = planner.plan_offload(world([a, b], ram_cap_mib=50), None, to_disk=False, exclude=set())
    assert plan.gpu_victims == [a, b] and plan.to_disk == {"m:a", "m:b"}  # 80 MB of pools would not fit in 50
    plan = planner.plan_offload(world([a, b], ram_cap_mib=100), None, to_disk=False, exclude=set())
    assert plan.to_disk == set()


def test_oom_retry_victims_keep_the_ram_cap():
    target, idle = rec("m:t", 30, tier=RAM, pool_mib=30), rec("m:i", 40)
    plan = planner.Plan(target, Action.UP, 0)
    extra = planner.plan_oom_retry(world([target, idle], ram_cap_mib=50), plan)
    assert extra == [idle] and "m:i" in plan.to_disk  # 30 MB pool + 40 MB more would pass the 50 MB cap


def test_ram_plan_drops_pools_of_gpu_models_before_evicting_parked_ones():
    on_gpu = rec("m:g", 30, pool_mib=30)
    parked = rec("m:r", 30, tier=RAM)
    w = world([on_gpu, parked], ram_cap_mib=70)
    plan = planner.Plan(None)
    assert planner.plan_ram(w, plan, 20 * MiB, set())
    assert plan.pool_drops == [on_gpu] and plan.ram_victims == []
    plan = planner.Plan(None)
    assert planner.plan_ram(w, plan, 50 * MiB, set()) and plan.ram_victims == [parked]
    assert not planner.plan_ram(w, planner.Plan(None), 500 * MiB, set())


def test_pressure_and_keep_alive_plans():
    a, b = rec("m:a", 40), rec("m:b", 40, leases=1)
    plan, events = planner.plan_pressure(world([a, b], capacity_mib=60), None, lambda r: 0.0)
    assert plan.gpu_victims == [a] and events[0][0] == "pressure"
    plan, events = planner.plan_pressure(world([a, b]), 10.0, lambda r: 11.0)
    assert plan.gpu_victims == [a] and events[0][:2] == ("keep_alive", "m:a")


def test_room_for_a_training_lease_coming_back():
    a = rec("m:a", 40)
    assert planner.plan_room(world([a]), 50 * MiB, others_hold=False) is None
    plan = planner.plan_room(world([a]), 70 * MiB, others_hold=False)
    assert plan.gpu_victims == [a]
    leased = rec("m:a", 40, leases=1)
    assert planner.plan_room(world([leased]), 70 * MiB, others_hold=True) is False
    assert planner.plan_room(world([leased]), 70 * MiB, others_hold=False) is None  # nothing to wait for


def test_oom_floor_is_retired_after_leases_measured_below_it():
    r = rec("m:a", 40)
    r.raise_floor(30 * MiB)
    assert r.working_need(0) == 30 * MiB
    for _ in range(3):
        r.record_peak(2 * MiB)
    assert r.working_need(0) == 30 * MiB
    r.record_peak(2 * MiB)
    assert r.working_need(0) == 2 * MiB
