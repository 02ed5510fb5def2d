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
import os
import platform
import statistics
import sys
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


# ---------------------------------------------------------------- bench/RESULTS.md sections

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def environment():
    """One line saying when and where a table was measured: date, machine, load average and
    the versions that move the numbers."""
    import torch

    versions = [f"torch {torch.__version__}"]
    for name in ("triton", "transformers", "vllm"):
        module = sys.modules.get(name)
        if module is not None:
            versions.append(f"{name} {module.__version__}")
    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{time.strftime('%Y-%m-%d')}, {cpu} {os.cpu_count()} cores{gpu}, load average "
            f"{os.getloadavg()[0]:.2f}, {torch.get_num_threads()} torch thread(s), "
            f"{', '.join(versions)}")


def command_line(script, argv):
    """The command that regenerates a section: the script and its options, less --write."""
    return " ".join(["python", f"bench/{script}"] + [a for a in argv if a != "--write"])


def write_section(name, body):
    """Replace the text between `<!-- NAME: begin -->` and `<!-- NAME: end -->` in
    bench/RESULTS.md by body. The markers are placed by hand where the table belongs; a
    missing marker stops the benchmark rather than appending somewhere."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    with open(RESULTS) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise SystemExit(f"bench/RESULTS.md has no {begin} ... {end} markers: add them where "
                         "the table goes")
    head, rest = text.split(begin, 1)
    text = head + begin + "\n" + body.strip("\n") + "\n" + end + rest.split(end, 1)[1]
    with open(RESULTS, "w") as f:
        f.write(text)
