"""The pool-or-one-thread choice (``ffo_core.engine.solves.ThreadChoice``)."""

import copy
import pickle

from ffo_core.engine.solves import ThreadChoice, run_batch


def test_probes_alternate_then_the_faster_setting_wins():
    choice = ThreadChoice(probes=2)
    seen = []
    for _ in range(4):
        jobs = choice.choose(2)
        seen.append(jobs)
        choice.times.setdefault(jobs, []).append(1.0 if jobs == 1 else 2.0)
    assert sorted(seen) == [1, 1, 2, 2] and seen[0] == 2
    assert choice.choose(2) == 1  # one thread measured faster
    choice.times[2] = [0.1, 0.1, 0.1]
    assert choice.choose(2) == 2  # now the pool is faster


def test_one_job_is_never_a_pool_and_results_keep_their_order():
    choice = ThreadChoice()
    assert choice.choose(1) == 1
    out = choice.run(lambda i: i * i, 7, 2)
    assert out == [i * i for i in range(7)] == run_batch(lambda i: i * i, 7, 1)
    assert sum(len(v) for v in choice.times.values()) == 1


def test_pickles_and_copies_with_its_measurements():
    choice = ThreadChoice()
    choice.run(lambda i: i, 4, 2)
    for other in (pickle.loads(pickle.dumps(choice)), copy.deepcopy(choice)):
        assert other.times == choice.times
        assert other.run(lambda i: -i, 3, 2) == [0, -1, -2]


def test_both_layers_reject_a_bad_thread_count():
    import pytest

    from ffo_core import FFOQPLayer
    from ffo_core.engine.solves import BatchRunner
    from ffo_core.errors import ConfigError

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="n_jobs must be a positive int"):
            FFOQPLayer(n_jobs=bad)
    runner = BatchRunner(FFOQPLayer().backend, 1)
    assert runner.run("backward", lambda i: i + 1, 3) == [1, 2, 3]


def test_only_the_probes_are_recorded():
    choice = ThreadChoice(probes=2)
    for _ in range(20):
        choice.run(lambda i: i, 4, 2)
    assert sorted(len(v) for v in choice.times.values()) == [2, 2]


def test_the_other_setting_is_probed_again_and_can_win():
    choice = ThreadChoice(probes=2, reprobe_every=8)
    choice.times = {1: [1.0, 1.0], 2: [2.0, 2.0]}
    seen = [choice.choose(2) for _ in range(16)]
    assert seen.count(2) == 2 and seen[7] == seen[15] == 2  # every 8th call
    choice.times[2] = [2.0, 0.5]  # the pool got faster meanwhile
    assert choice.choose(2) == 2
