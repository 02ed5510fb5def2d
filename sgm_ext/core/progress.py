"""Progress bars: tqdm on stderr when enabled, an object that does nothing otherwise."""
import sys


class _Silent:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total, *, desc, unit, enabled=True, initial=0, leave=True):
    """A tqdm bar (update(n), close()) on stderr, or a silent stand-in when not enabled."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                leave=leave)
