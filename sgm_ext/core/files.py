"""Writing files: atomically (a crash never leaves half of one: write beside, fsync, rename),
and never over a file that is not ours (checked before any work is done)."""
import contextlib
import hashlib
import json
import os
import re
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path in `path`'s directory; when the block ends without an error,
    the file written there replaces `path` in one step (an old file stays intact otherwise)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as e:  # named by the path asked for, not the temporary one
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename makes it the real file
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))  # mkstemp's 600 would make every output private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def umask_mode(mode):
    """`mode` less the process's umask: the mode open() or mkdir() would give a new file or
    directory (tempfile's 600 / 700 are for the temporary names only, never for outputs)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mode & ~mask


def make_temp_dir(out):
    """A new temporary directory beside `out` (same file system, so the finished one is
    renamed into place), named after it and with the mode mkdir would give `out`; a
    ValueError naming `out`, not the temporary name, when it cannot be made."""
    out = os.fspath(out)
    try:
        tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)),
                               prefix=f".{os.path.basename(out)}.tmp-")
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from None
    os.chmod(tmp, umask_mode(0o777))
    return tmp


def write_text(path, text):
    """Write a text file atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_json(path, obj, indent=None):
    """Write a JSON file atomically."""
    return write_text(path, json.dumps(obj, indent=indent))


# Weight files of a Hugging Face model directory (one with a config.json): never written over,
# and never created there either (a model.safetensors beside shards would be loaded instead).
_WEIGHT_FILES = re.compile(r"(model|pytorch_model|adapter_model|tf_model)([-.].*)?"
                           r"\.(safetensors|bin|h5|msgpack|pt|pth)(\.index\.json)?$|.*\.gguf$")


def check_output_file(path, option, *, ours, force=False):
    """Refuse an output path before any work is done: a directory, a missing parent
    directory, a model directory's weight file, or an existing file that `ours(path)` does not
    recognise as one this option writes (unless force). ValueError naming the option."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory; give a file name, e.g. "
                         f"{os.path.join(path, 'scales.safetensors')}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: the directory {parent} does not exist")
    name = os.path.basename(path)
    if os.path.exists(os.path.join(parent, "config.json")) and _WEIGHT_FILES.match(name) \
            and not (os.path.exists(path) and ours(path)):
        raise ValueError(f"{option} {path} is a weight file name in a model directory; sgm-ext "
                         "never writes there (write the scales next to the model instead)")
    if os.path.exists(path) and not ours(path) and not force:
        raise ValueError(f"{option} {path} exists and is not a file sgm-ext wrote; refusing to "
                         "overwrite it (pass --force to overwrite)")


def file_sha256(path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
