"""Moving real model kinds through the pinned pool on the simulated card: plain modules, bitsandbytes 4-bit,
ultralytics YOLO, diffusers pipelines, and loaders with their own mover (CTranslate2 style)."""

from __future__ import annotations

import torch

from studio.residency.pinned import move_down, move_up, tensor_slots
from studio.residency.simulated import FakeProbe, SimulatedAccelerator
from tests.test_residency_support import MiB, Net, NetLoader, on_device, sim_manager, tiers

X = torch.ones(2, 256)


def _sim():
    probe = FakeProbe(200 * MiB)
    return SimulatedAccelerator(probe)


def test_pinned_pool_is_reused_and_clean_swaps_skip_the_copy():
    manager, _, _ = sim_manager(100)
    for key in ("m:a", "m:b"):
        manager.register(NetLoader(key, 60))
    with manager.use("m:a", working_bytes=0) as a:
        expected = a(X)
    pool = manager._records["m:a"].pool
    buffer_ptr = pool.host.tensor.data_ptr()
    down_before = manager.snapshot().metrics.counters["bytes_down"]
    with manager.use("m:b", working_bytes=0):  # a -> RAM, into the same buffers, no copy (unchanged)
        pass
    assert manager._records["m:a"].pool is pool and pool.host.tensor.data_ptr() == buffer_ptr
    assert manager.snapshot().metrics.counters["bytes_down"] == down_before
    with manager.use("m:a", working_bytes=0) as a:  # back up, then change a weight in place
        assert torch.equal(a(X), expected)
        with torch.no_grad():
            a.fc.weight.mul_(2)
        expected2 = a(X)
    with manager.use("m:b", working_bytes=0):  # dirty: the copy happens, into the same buffers
        pass
    assert manager._records["m:a"].pool is pool and pool.reuses == 2
    changed = 60 * MiB  # only the weight that changed is copied; the buffer and the anchors are not
    assert manager.snapshot().metrics.counters["bytes_down"] == down_before + changed
    assert manager.snapshot().models[0].pool_reuses == 2
    with manager.use("m:a", working_bytes=0) as a:
        assert torch.equal(a(X), expected2)


def test_move_keeps_identity_drops_grads_and_adopts_new_tensors():
    accel = _sim()
    model = Net(1)
    weight, optim = model.fc.weight, torch.optim.SGD(model.parameters(), lr=0.1)
    up = move_up(model, None, accel, accel.host_buffer)
    assert on_device(accel, model) and model.fc.weight is weight and up.copied == up.bytes
    model(X).sum().backward()
    optim.step()  # in-place update: version counter moves, so the next swap-down must copy
    trained = model.fc.weight.detach().clone()
    down = move_down(model, up.pool, accel, accel.host_buffer)
    assert down.copied == model.fc.weight.numel() * 4 < down.bytes and model.fc.weight.grad is None  # only it changed
    assert not on_device(accel, model) and torch.equal(model.fc.weight, trained)
    model.extra = torch.ones(3)  # a tensor added while parked: layout changes, a new pool is made
    up2 = move_up(model, down.pool, accel, accel.host_buffer)
    assert up2.pool is not down.pool and accel.on_device(model.extra) and torch.equal(model.fc.weight, trained)


def _linear4bit(bnb, w: torch.Tensor):
    lin = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True, module=lin)
    lin.weight = lin.weight._quantize("cpu")
    lin.quant_state = lin.weight.quant_state
    torch.nn.init.zeros_(lin.bias)
    return torch.nn.Sequential(lin).eval().requires_grad_(False)


def test_bitsandbytes_4bit_quant_state_moves_with_the_weights():
    import bitsandbytes as bnb

    w, x = torch.randn(64, 128) * 0.1, torch.randn(3, 128)
    with torch.no_grad():
        expected = _linear4bit(bnb, w)(x)  # same quantisation, never moved
    model = _linear4bit(bnb, w)
    lin = model[0]
    qs = lin.weight.quant_state
    state = (lin.weight, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code)
    slots = {id(t) for t in tensor_slots(model)}
    assert all(id(t) in slots for t in state)
    accel = _sim()
    up = move_up(model, None, accel, accel.host_buffer)
    assert all(accel.on_device(t) for t in state)
    assert lin.quant_state is qs and lin.weight.quant_state is qs and isinstance(lin.weight, bnb.nn.Params4bit)
    down = move_down(model, up.pool, accel, accel.host_buffer)
    assert down.copied == 0 and not any(accel.on_device(t) for t in state)  # unchanged: the pool held these bytes
    move_up(model, down.pool, accel, accel.host_buffer)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    # a CPU forward may repack the weights for bitsandbytes' CPU kernels; a later move up undoes it
    down = move_down(model, down.pool, accel, accel.host_buffer)
    move_up(model, down.pool, accel, accel.host_buffer)
    assert not getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    with torch.no_grad():  # bitsandbytes' CPU repacking rounds absmax to bf16, hence the tolerance
        assert torch.allclose(model(x), expected, atol=2e-2, rtol=2e-2)


def test_ultralytics_yolo_anchors_move_and_detections_match():
    import ultralytics

    yolo = ultralytics.YOLO("yolov8n.yaml")  # architecture from the packaged yaml, random weights, no download
    net = yolo.model.eval()
    img = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():  # as ultralytics' predict runs: anchors/strides become inference tensors
        expected = net(img)[0]  # also fills Detect.anchors/strides (plain tensor attributes)
    head = net.model[-1]
    assert head.anchors.is_inference()
    accel = _sim()
    up = move_up(yolo, None, accel, accel.host_buffer)
    assert accel.on_device(head.anchors) and accel.on_device(head.stride) and on_device(accel, net)
    assert not head.anchors.is_inference()  # replaced by a normal copy: inference tensors cannot take new .data
    down = move_down(yolo, up.pool, accel, accel.host_buffer)
    assert down.copied == 0  # nothing changed since the upload
    move_up(yolo, down.pool, accel, accel.host_buffer)
    with torch.inference_mode():
        assert torch.equal(net(img)[0], expected)
        head.shape = None  # as after an image of another size: Detect recomputes anchors (new inference tensors)
        net(img)
    assert head.anchors.is_inference()
    down = move_down(yolo, down.pool, accel, accel.host_buffer)
    move_up(yolo, down.pool, accel, accel.host_buffer)
    with torch.inference_mode():
        assert torch.equal(net(img)[0], expected)


def test_diffusers_pipeline_components_all_move():
    from backends.image import tiny

    configs = tiny.TINY_CONFIGS[sorted(tiny.TINY_CONFIGS)[0]]
    torch.manual_seed(0)
    pipe = tiny.assemble_pipeline(configs["arch"], tiny.build_components(configs, tokenizer=tiny.build_tokenizer()))
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert len(modules) >= 3
    accel = _sim()
    up = move_up(pipe, None, accel, accel.host_buffer)
    assert all(on_device(accel, m) for m in modules)
    assert up.bytes >= sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    down = move_down(pipe, up.pool, accel, accel.host_buffer)
    assert not any(accel.on_device(p) for m in modules for p in m.parameters()) and down.pool is up.pool


class FakeCT2:
    """Stands in for a CTranslate2 model: moves itself, its VRAM shows only in the probe."""

    def __init__(self, probe: FakeProbe, nbytes: int) -> None:
        self.probe, self.nbytes, self.device, self.calls = probe, nbytes, None, []

    def to(self, device: str) -> None:
        if device == "cuda" and self.device != "cuda":
            self.probe.own_extra_bytes += self.nbytes
        if device == "cpu" and self.device == "cuda":
            self.probe.own_extra_bytes -= self.nbytes
        self.device = device
        self.calls.append(device)


class FakeCT2Loader:
    def __init__(self, key: str, probe: FakeProbe, nbytes: int) -> None:
        self.key, self.probe, self.nbytes, self.released = key, probe, nbytes, 0

    def estimate_bytes(self) -> int:
        return self.nbytes // 2  # deliberately wrong: the manager must measure

    def load(self, device: str) -> FakeCT2:
        model = FakeCT2(self.probe, self.nbytes)
        model.to(device)
        return model

    def to_device(self, obj: FakeCT2, device: str) -> FakeCT2:
        obj.to(device)  # CTranslate2: unload_model(to_cpu=True) / load_model()
        return obj

    def release(self, obj: FakeCT2) -> None:
        obj.to("cpu")
        self.released += 1


def test_loader_with_its_own_mover_is_measured_through_the_probe():
    manager, probe, _ = sim_manager(100)
    manager.register(FakeCT2Loader("asr:fake", probe, 30 * MiB))
    manager.register(NetLoader("m:big", 60))
    with manager.use("asr:fake", working_bytes=0) as asr:
        assert asr.device == "cuda"
    assert manager.snapshot().models[0].bytes == 30 * MiB  # measured, not the 15 MiB estimate
    with manager.use("m:big", working_bytes=0):
        pass
    with manager.use("m:big", working_bytes=0), manager.use("asr:fake", working_bytes=0):
        pass  # 60 + 30 fit in 100 together
    manager.offload("asr:fake")
    assert asr.calls[-1] == "cpu" and tiers(manager)["asr:fake"] == "ram"
    with manager.use("asr:fake", working_bytes=0) as again:
        assert again is asr and asr.calls[-1] == "cuda"


def _sim_recording_copies() -> tuple[SimulatedAccelerator, list[str]]:
    """A simulated card whose host -> device copies log "copy started" and "copy waited" into the returned list."""
    accel, events = _sim(), []
    start = accel.start_copy_in

    def recording_start(dst, src, pinned):
        events.append("copy started")
        wait = start(dst, src, pinned)
        return lambda: (events.append("copy waited"), wait())

    accel.start_copy_in = recording_start
    return accel, events


def test_a_swap_in_starts_the_copy_before_walking_the_model_and_falls_back_when_it_left_its_pool():
    from studio.residency.pinned import host_tensors, upload_pool

    accel, events = _sim_recording_copies()
    model = Net(1)
    up = move_up(model, None, accel, accel.host_buffer)
    expected = model(X)
    down = move_down(model, up.pool, accel, accel.host_buffer)
    events.clear()

    def walk():
        events.append("walked")
        return host_tensors(model, accel)

    assert upload_pool(down.pool, accel, walk) is not None
    assert events == ["copy started", "walked", "copy waited"] and on_device(accel, model)
    assert torch.equal(model(X), expected)
    down = move_down(model, down.pool, accel, accel.host_buffer)
    model.fc.weight.data = model.fc.weight.data.clone() * 2  # replaced while parked: no longer a view of the pool
    assert upload_pool(down.pool, accel, walk) is None and not on_device(accel, model)  # nothing changed


def test_the_manager_swaps_in_a_model_whose_tensor_was_replaced_while_parked():
    manager, _, _ = sim_manager(100)
    for key in ("m:a", "m:b"):
        manager.register(NetLoader(key, 60))
    with manager.use("m:a", working_bytes=0):
        pass
    with manager.use("m:b", working_bytes=0):  # a -> RAM
        pass
    parked = manager._records["m:a"].obj
    with torch.no_grad():
        parked.fc.weight.data = torch.full_like(parked.fc.weight, 0.5)  # a new host tensor, outside the pool
    with manager.use("m:a", working_bytes=0) as a:
        assert on_device(manager._accel, a) and float(a.fc.weight[0, 0]) == 0.5


def test_a_swap_in_whose_walk_fails_still_waits_for_its_copy_before_the_buffer_can_be_freed():
    import pytest

    from studio.residency.pinned import upload_pool

    accel, events = _sim_recording_copies()
    model = Net(1)
    up = move_up(model, None, accel, accel.host_buffer)
    down = move_down(model, up.pool, accel, accel.host_buffer)

    def broken_walk():
        raise RuntimeError("a module changed under us")

    with pytest.raises(RuntimeError, match="changed under us"):
        upload_pool(down.pool, accel, broken_walk)
    assert events[-2:] == ["copy started", "copy waited"]
