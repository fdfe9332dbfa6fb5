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
