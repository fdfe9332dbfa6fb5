"""When the step-time measurement counts as taken on a loaded machine."""
from __future__ import annotations

from foundry_upcycle.study.timing import MIN_CPU_SHARE, is_loaded


def test_one_thread_is_judged_by_its_cpu_share_not_the_lagging_load_average():
    # right after the study's own parallel runs the 1-minute load average still reads ~2.4 on 2 cores, but the
    # timing process had its core: not loaded
    assert not is_loaded([2.42, 2.65, 2.31], [2.31, 2.62, 2.3], cpus=2, threads=1, cpu_share=0.98)
    # another process shared the core: half the wall time went elsewhere
    assert is_loaded([0.1, 0.1, 0.1], [0.2, 0.1, 0.1], cpus=2, threads=1, cpu_share=0.5)
    assert is_loaded(None, None, cpus=2, threads=1, cpu_share=MIN_CPU_SHARE - 0.01)


def test_several_threads_fall_back_to_the_load_average():
    # CPU time of busy-waiting OpenMP threads says nothing about contention
    assert is_loaded([5.0, 4.0, 3.0], [5.0, 4.0, 3.0], cpus=2, threads=2, cpu_share=1.9)
    assert not is_loaded([0.2, 0.1, 0.1], [1.9, 0.5, 0.2], cpus=2, threads=2, cpu_share=1.9)


def test_steps_interleave_after_a_warm_up_that_is_not_counted():
    """Fake steps with scripted durations: the call order, that warm-up steps never reach the medians, and the
    exact ratio of the medians."""
    from foundry_upcycle.study.timing import interleave, summarize
    calls: list[str] = []
    # warm-up steps are slow (100 s) on purpose: a median that saw one would show it
    script = {'cpt': iter([100.0] * 3 + [0.10, 0.30, 0.20, 0.20, 0.50, 0.10, 0.20, 0.40, 0.20, 0.30, 0.20, 0.10]),
              'upcycle': iter([100.0] * 3 + [0.35, 0.25, 0.30, 0.30, 0.90, 0.30, 0.25, 0.30, 0.35, 0.30, 0.30, 0.40])}

    def fake(arm):
        def step():
            calls.append(arm)
            wall = next(script[arm])
            return wall, 0.9 * wall
        return step
    times, cpu = interleave({'cpt': fake('cpt'), 'upcycle': fake('upcycle')}, warmup=3, rounds=6, steps_per_round=2)
    assert calls == ['cpt'] * 3 + ['upcycle'] * 3 + (['cpt'] * 2 + ['upcycle'] * 2) * 6
    assert max(times['cpt']) < 100 and max(times['upcycle']) < 100 and len(times['cpt']) == 12
    out = summarize(times, cpu)
    assert out['step_time_s'] == {'cpt': 0.2, 'upcycle': 0.3}                  # medians of the 12 recorded steps
    assert out['ratio'] == 0.3 / 0.2 and out['ratios'] == {'upcycle': 0.3 / 0.2}
    assert out['cpu_share'] == 0.9 and out['steps_s']['upcycle'][:3] == [0.35, 0.25, 0.3]
