"""One timer for the benchmark scripts (run as `python benchmarks/NAME.py`, so importable).

On CUDA: triton's `do_bench` (warm-up, cache flush between calls, median), or with
`graph=True` its `do_bench_cudagraph` (the calls captured once into a CUDA graph and replayed:
device time alone, none of the host's launch and dispatch cost). On the CPU: the fastest of
`repeat` calls after a warm-up call, which is robust to other processes sharing the cores.
"""
import time
from collections.abc import Callable


def seconds(fn: Callable[[], object], on_gpu: bool, repeat: int = 20,
            graph: bool = False) -> float:
    """Seconds per fn() call; the first call (compiles, autotunes) is not timed."""
    if on_gpu and graph:
        from triton.testing import do_bench_cudagraph
        return do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
    if on_gpu:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
