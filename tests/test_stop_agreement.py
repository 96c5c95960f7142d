"""One stop decision for all hosts (2 local jax.distributed processes, gloo CPU collectives, the
worker of test_multihost.py): SIGTERM to one host stops both at the same step, saved, with the
requeue exit code, and the restarted pair continues as if uninterrupted; a host killed outright
makes the other exit with an error, not hang.
"""
import os
import signal
import time

import pytest

import test_multihost
from test_multihost import STEPS, as_steps, host_batches, losses, run_config
from two_hosts import finish, start

WORKER = test_multihost.__file__
DEAD_HOST_BOUND_S = 150  # JAX's distributed heartbeat timeout (ul2lab.train.distributed), plus slack


def wait_for_logged_steps(model_dir, count, procs, timeout=240):
    """Until host 0 (which alone writes metrics.jsonl) logged `count` steps, both hosts alive."""
    path = os.path.join(model_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), finish(procs, 10)
        if os.path.exists(path):
            with open(path) as f:
                if len(f.readlines()) >= count:
                    return
        time.sleep(0.1)
    raise AssertionError(f"no {count} logged steps in {timeout}s: {finish(procs, 1)}")


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step_and_the_pair_resumes_exactly(tmp_path):
    import numpy as np
    from ul2lab.train import loop as trainer
    from ul2lab.train.config import PREEMPTED_EXIT_CODE

    model_dir = tmp_path / "two_hosts"
    procs = start(WORKER, tmp_path / "first", ["--model_dir", model_dir, "--train_steps", STEPS,
                                               "--seconds_per_batch", 1.5], tmp_path / "cache")
    wait_for_logged_steps(model_dir, 1, procs)
    procs[1].send_signal(signal.SIGTERM)  # host 1 only: host 0 learns it through the agreement
    outputs = finish(procs, 240)
    assert [p.returncode for p in procs] == [PREEMPTED_EXIT_CODE] * 2, outputs
    saved = [[line for line in text.splitlines() if "saved step" in line] for text in outputs]
    assert len(saved[0]) == len(saved[1]) == 1, outputs
    step = int(saved[1][0].split("saved step ")[1].split()[0])
    assert 1 < step < STEPS and f"saved step {step} " in saved[0][0], saved
    assert "another host" in saved[0][0] and "SIGTERM" in saved[1][0]

    second = test_multihost.run_two_hosts(model_dir, STEPS, tmp_path / "second", tmp_path / "cache")[0]
    assert sorted(as_steps(second[0]["losses"])) == list(range(step + 1, STEPS + 1))
    one_host = losses(trainer.train(run_config(tmp_path / "one_host", STEPS, num_devices=4), host_batches))
    resumed = test_multihost.logged_losses(model_dir)  # every session's records, the latest winning
    steps = sorted(one_host)
    assert sorted(resumed) == steps
    np.testing.assert_allclose([resumed[s] for s in steps], [one_host[s] for s in steps], rtol=2e-5)


@pytest.mark.slow
def test_a_host_killed_outright_makes_the_other_exit_with_one_line(tmp_path):
    model_dir = tmp_path / "two_hosts"
    procs = start(WORKER, tmp_path / "run", ["--model_dir", model_dir, "--train_steps", 50,
                                             "--seconds_per_batch", 0.5], tmp_path / "cache")
    wait_for_logged_steps(model_dir, 1, procs)
    procs[1].kill()
    killed_at = time.time()
    output = finish(procs[:1], DEAD_HOST_BOUND_S)[0]
    assert time.time() - killed_at < DEAD_HOST_BOUND_S and procs[0].returncode > 0, (procs[0].returncode, output)
    assert "Traceback" not in output, output[-3000:]
