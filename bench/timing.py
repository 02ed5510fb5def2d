"""The one timing harness of the benchmarks.

    from timing import interleaved, medians, timed    # bench/ is on sys.path in a script

timed(fn, *args)      one call: (wall seconds, CPU seconds of this process, result)
interleaved(fns, ...) every callable in turn, round after round: {name: [sample, ...]}
medians(samples)      {name: median}, per component where the samples are tuples

Why interleaved: on a shared machine the noise (another process taking a core, a frequency
step, a thermal throttle) comes in bursts of seconds. Timing variant A a hundred times and then
B a hundred times lets a burst land on one of them and shows up as a ratio; calling A, B, A,
B, ... puts every burst on all variants alike, and the medians then drop the rounds it hit.

Clocks:
  "wall"  time.perf_counter, seconds: what a user waits.
  "cpu"   time.process_time, seconds: CPU time of this process, all its threads together. On a
          shared machine this is what the work costs; wall time also counts the time spent
          waiting for a core that another process holds.
  "both"  (wall, cpu) tuples, from timed().
  "cuda"  CUDA events recorded around the call, milliseconds (what Event.elapsed_time gives):
          the GPU's own clock, so host-side jitter and launch queuing before the first kernel
          stay out. The callable must put its work on the current stream; the end event is
          waited for after each call.
"""
import statistics
import time

CLOCKS = ("wall", "cpu", "both", "cuda")


def timed(fn, *args, **kwargs):
    """Call fn(*args, **kwargs) once; (wall seconds, CPU seconds of this process, its result).

    Both clocks, because on a shared machine they disagree: the CPU time of a one-thread run is
    what the work costs, the wall time also counts other processes holding the cores."""
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - w, time.process_time() - c, out


def _sampler(clock):
    """A function that calls fn() once and returns its sample on `clock` (nothing else inside
    the timed span: a wall clock sample does not pay for reading the CPU clock)."""
    if clock == "wall":
        def sample(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    elif clock == "cpu":
        def sample(fn):
            t0 = time.process_time()
            fn()
            return time.process_time() - t0
    elif clock == "both":
        def sample(fn):
            w, c, _ = timed(fn)
            return w, c
    elif clock == "cuda":
        import torch

        def sample(fn):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        raise ValueError(f"clock must be one of {CLOCKS}, not {clock!r}")
    return sample


def interleaved(fns, *, rounds=None, warmup=0, min_time=None, min_reps=5, max_reps=200,
                clock="wall"):
    """Run the no-argument callables of `fns` round-robin; {name: [one sample per round]}.

    First `warmup` untimed rounds (compiling, caches, lazy allocation: the first calls of a
    variant are not what it costs). Then timed rounds, each calling every callable once in the
    order of `fns`, so that noise on the machine hits all of them alike (see the module doc).

    Stopping: exactly `rounds` rounds; or, with `min_time` instead, until `max_reps` rounds, or
    at least `min_reps` rounds once more than `min_time` seconds (wall, from the first timed
    round, checked after each round) have passed: enough samples for a steady median on fast
    calls without letting slow ones run long. Give one of `rounds` and `min_time`.

    Samples are seconds on clock "wall" or "cpu", (wall, cpu) seconds on "both", milliseconds
    on "cuda" (see the module doc)."""
    if (rounds is None) == (min_time is None):
        raise ValueError("give exactly one of rounds and min_time")
    sample = _sampler(clock)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    reps = 0
    while True:
        if rounds is not None and reps >= rounds:
            return times
        for name, fn in fns.items():
            times[name].append(sample(fn))
        reps += 1
        if rounds is None and (reps >= max_reps or
                               (reps >= min_reps and time.perf_counter() - start > min_time)):
            return times


def medians(samples):
    """{name: median of its samples}; for tuple samples (clock "both") a tuple of medians, one
    per component. The median, not the mean: the rounds a burst of noise hit are outliers, and
    the median drops them where the mean would carry them into every ratio."""
    out = {}
    for name, ts in samples.items():
        if ts and isinstance(ts[0], tuple):
            out[name] = tuple(statistics.median(t[i] for t in ts) for i in range(len(ts[0])))
        else:
            out[name] = statistics.median(ts)
    return out
