"""Learning-rate schedules against their closed-form definitions, written out here in numpy."""
import math
import os

import jax
import numpy as np
import pytest

from ul2lab.train import schedules

PEAK, WARMUP, COOLDOWN, CONST, ANNEAL_START, ANNEAL_STEPS, END = 1e-2, 100, 400, 2e-3, 1500, 300, 1e-4
BOUNDARIES = (WARMUP, WARMUP + COOLDOWN, ANNEAL_START, ANNEAL_START + ANNEAL_STEPS)


def infinite_formula(t, cooldown):
    """The issue's definition, float64."""
    if t < WARMUP:
        return PEAK * t / WARMUP
    if t < WARMUP + COOLDOWN:
        x = (t - WARMUP) / COOLDOWN
        if cooldown == "cosine":
            return CONST + (PEAK - CONST) * 0.5 * (1 + math.cos(math.pi * x))
        h = lambda x: 1 / math.sqrt(1 + 10 * x) - 1
        return PEAK + (CONST - PEAK) * h(x) / h(1)
    if t < ANNEAL_START:
        return CONST
    if t <= ANNEAL_START + ANNEAL_STEPS:
        return CONST * (END / CONST) ** ((t - ANNEAL_START) / ANNEAL_STEPS)
    return END


def make(cooldown, **kw):
    return schedules.infinite_schedule(PEAK, WARMUP, COOLDOWN, CONST, ANNEAL_START, ANNEAL_STEPS, END,
                                       cooldown=cooldown, **kw)


@pytest.mark.parametrize("cooldown", ["cosine", "inverse_sqrt"])
def test_infinite_schedule_equals_formula(cooldown):
    sched = make(cooldown)
    probes = [0, 1, 37, 99, 100, 101, 180, 333, 499, 500, 501, 900, 1499, 1500, 1501, 1650, 1799, 1800,
              1801, 10_000]
    got = np.asarray(jax.jit(sched)(np.asarray(probes)))
    want = np.array([infinite_formula(t, cooldown) for t in probes])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    # the two cooldowns really differ in the middle (the probe would catch a swapped shape)
    other = "cosine" if cooldown == "inverse_sqrt" else "inverse_sqrt"
    assert abs(float(sched(180)) - infinite_formula(180, other)) > 1e-4


@pytest.mark.parametrize("cooldown", ["cosine", "inverse_sqrt"])
def test_infinite_schedule_continuous_at_phase_boundaries(cooldown):
    sched = make(cooldown)
    lr = np.asarray(sched(np.arange(ANNEAL_START + ANNEAL_STEPS + 10)), np.float64)
    for b in BOUNDARIES:
        # the step across the boundary is no bigger than a step inside either neighbouring phase
        across = abs(lr[b] - lr[b - 1])
        inside = max(abs(lr[b - 1] - lr[b - 2]), abs(lr[b + 1] - lr[b]))
        assert across <= inside * 1.01 + 1e-9, (b, across, inside)
    # exact landings
    assert lr[WARMUP] == np.float32(PEAK)
    assert lr[WARMUP + COOLDOWN] == np.float32(CONST)
    assert lr[ANNEAL_START] == np.float32(CONST)
    assert lr[ANNEAL_START + ANNEAL_STEPS] == np.float32(END)
    assert np.all(np.diff(lr[WARMUP:]) <= 0)  # never rises after the peak


def test_infinite_schedule_without_anneal_stays_constant_and_phases():
    sched = schedules.infinite_schedule(PEAK, WARMUP, COOLDOWN, CONST)
    assert float(sched(10**7)) == np.float32(CONST)
    assert [sched.phase(t) for t in (0, 99, 100, 499, 500, 10**7)] == \
        ["warmup", "warmup", "cooldown", "cooldown", "constant", "constant"]
    assert not sched.in_constant_phase(499) and sched.in_constant_phase(500)
    annealed = make("cosine")
    assert [annealed.phase(t) for t in (1499, 1500, 1799, 1800)] == ["constant", "anneal", "anneal", "end"]


def test_continual_start_step_resumes_at_constant_without_rewarming():
    sched = schedules.infinite_schedule(PEAK, WARMUP, COOLDOWN, CONST, start_step=2000)
    lr = np.asarray(sched(np.arange(50)))
    assert np.all(lr == np.float32(CONST)) and sched.in_constant_phase(0)


def test_branch_anneal_from_constant_checkpoint():
    main = schedules.infinite_schedule(PEAK, WARMUP, COOLDOWN, CONST)
    branch = main.branch_anneal(800, anneal_steps=200, end_value=END)
    assert float(branch(799)) == np.float32(CONST)  # identical to the main run up to the branch
    np.testing.assert_allclose(float(branch(900)), CONST * (END / CONST) ** 0.5, rtol=2e-6)
    assert float(branch(1000)) == np.float32(END)
    assert float(main(1000)) == np.float32(CONST)  # the main run is untouched
    with pytest.raises(ValueError, match="constant phase"):
        main.branch_anneal(300, anneal_steps=200, end_value=END)


@pytest.mark.parametrize("kwargs, match", [
    (dict(anneal_start=300), "anneal_start .* before the end of warmup"),
    (dict(peak_value=0.0), "peak_value must be positive"),
    (dict(constant_value=-1.0), "constant_value must be positive"),
    (dict(end_value=-1e-3), "end_value must be non-negative"),  # 0 is an anneal to 0 (linear)
    (dict(anneal_steps=0), "anneal_steps must be positive"),
    (dict(warmup_steps=-5), "warmup_steps must be non-negative"),
    (dict(cooldown="linear"), "cooldown must be one of"),
    (dict(constant_value=0.1), "above peak_value"),
    (dict(end_value=0.1), "end_value .* above constant_value"),
])
def test_infinite_schedule_rejects_bad_arguments(kwargs, match):
    args = dict(peak_value=PEAK, warmup_steps=WARMUP, cooldown_steps=COOLDOWN, constant_value=CONST,
                anneal_start=ANNEAL_START, anneal_steps=ANNEAL_STEPS, end_value=END)
    with pytest.raises(ValueError, match=match):
        schedules.infinite_schedule(**{**args, **kwargs})


def test_rsqrt_is_t5x_constant_times_rsqrt_decay():
    sched = schedules.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=10_000)
    steps = np.array([0, 1, 5000, 10_000, 40_000, 1_000_000])
    want = 1.0 / np.sqrt(np.maximum(steps, 10_000))
    np.testing.assert_allclose(np.asarray(sched(steps)), want, rtol=1e-6)


def test_cosine_and_wsd_shapes():
    cos = schedules.cosine_schedule(1.0, warmup_steps=10, total_steps=110, end_value=0.1)
    np.testing.assert_allclose([float(cos(t)) for t in (0, 5, 10, 60, 110, 500)],
                               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1], rtol=1e-6, atol=1e-7)
    for decay, mid in [("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))]:
        wsd = schedules.wsd_schedule(2.0, warmup_steps=10, total_steps=100, decay_steps=20, decay=decay)
        np.testing.assert_allclose([float(wsd(t)) for t in (5, 10, 50, 80, 90, 100, 200)],
                                   [1.0, 2.0, 2.0, 2.0, 2.0 * mid, 0.0, 0.0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="exceed total_steps"):
        schedules.wsd_schedule(1.0, warmup_steps=90, total_steps=100, decay_steps=20)
    with pytest.raises(ValueError, match="total_steps .* must exceed warmup_steps"):
        schedules.cosine_schedule(1.0, warmup_steps=100, total_steps=100)


@pytest.mark.parametrize("gin_file, name, probes", [
    ("constant.gin", "constant_schedule", {0: 1e-3, 10**6: 1e-3}),
    ("rsqrt.gin", "rsqrt_schedule", {0: 0.01, 10_000: 0.01, 40_000: 0.005}),
    ("cosine.gin", "cosine_schedule", {0: 0.0, 1000: 1e-2, 5000: 1e-5}),
    ("wsd.gin", "wsd_schedule", {500: 5e-3, 3999: 1e-2, 5000: 0.0}),
    ("infinite.gin", "infinite_schedule", {500: 5e-3, 1000: 1e-2, 3000: 3e-3, 10**7: 3e-3}),
])
def test_gin_schedule_files(gin_file, name, probes):
    import gin
    from ul2lab.runs import gin_config as gin_registry
    configurables = gin_registry.register()
    gin.clear_config()
    try:
        gin.parse_config("TRAIN_STEPS = 5000")
        gin.parse_config_file(f"{os.path.dirname(__file__)}/../gin/schedules/{gin_file}")
        schedule = configurables[name]()
    finally:
        gin.clear_config()
    for step, want in probes.items():
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-9)
