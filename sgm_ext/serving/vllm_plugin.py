"""The vLLM plugin: a scale file served by vLLM, with CUDA graphs and torch.compile left on.

Installed as the entry point `sgm_ext` of the group `vllm.general_plugins`, so vLLM calls
register() in each of its processes (front end, engine core, every worker) before any model is
built. Settings come in vLLM's additional_config (part of its compile-cache key):

    LLM(model=DIR, additional_config={"sgm_ext": {"scales": "scales.safetensors",
                                                  "strength": 1.0, "per_request": True}})
    python -m vllm.entrypoints.openai.api_server --model DIR \\
        --additional-config '{"sgm_ext": {"scales": "scales.safetensors"}}'

register() wraps four vLLM functions (each once, however often it runs):
- EngineArgs.create_engine_config (front end): the settings are read, the scale file is checked
  against the model's config as sgm_ext.patch checks a model (unknown site, size, values,
  another model's file) and for what vLLM can serve; its content hash goes into the settings,
  so a compiled graph of another file, or of the unpatched model, is never reused. A bad file
  stops LLM() / the server here, before it listens.
- BaseModelLoader.load_model (workers): the loaded model is patched (sgm_ext.serving) before
  vLLM's warm-up, torch.compile and CUDA-graph capture.
- InputProcessor.process_inputs (front end): a request's `sgm_strength` is checked, and with
  per_request its cache_salt gets the strength, so requests of different strengths never share
  prefix-cache blocks (KV computed at one strength is wrong at another). A scale file changed
  on disk since start-up is logged here, at the next request (the server keeps what it loaded).
- the OpenAI server's middleware (vllm.entrypoints.launchers.app, in the server process only):
  a request body with an sgm_* key anywhere but vllm_xargs.sgm_strength (top level, misspelt),
  or a strength that is not a number (true / false, which vLLM would turn into 1 / 0, null, a
  string, an object), gets a one-line 400 before vLLM parses it.
- GPUModelRunner._prepare_inputs (workers, V1 runner; the CPU runner subclasses it): with
  per_request, each token row's strength is written into the model's strength buffer before
  the forward, in place.
A change after start-up is in place only (set_strength): vLLM's compiled graph ignores a module
replaced later, silently, so patching a running model is refused.
"""
import functools
import json
import logging
import sys

from ..core.pause import pause_point
from ..core.scale_math import check_strength
from .modules import patch_vllm_model
from .settings import (
    KEEPS_LOADED,
    REQUEST_KEY,
    REQUEST_PLACE,
    SETTINGS_KEY,
    ScaleFileWatch,
    check_for_serving,
    file_sha256,
    file_state,
    read_settings,
    request_body_problem,
    request_strength,
)

WORKER_EXTENSION = "sgm_ext.serving.vllm_plugin.WorkerExtension"
_APP_MODULE = "vllm.entrypoints.launchers.app"  # build_app: the OpenAI server's FastAPI app
_WATCHES = {}  # (scale file, sha256) -> ScaleFileWatch, in the front end
_SERVED_ATTR = "sgm_ext_served"  # on the vLLM model: the serving.ServedModel
log = logging.getLogger("vllm.sgm_ext")  # under vLLM's logger: its handler and format


def _wrap(owner, name, make):
    """Replace owner.name by make(original), once."""
    original = getattr(owner, name)
    if getattr(original, "_sgm_ext_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._sgm_ext_wrapped = True
    setattr(owner, name, wrapper)


def register():
    """vLLM's plugin hook (entry point group vllm.general_plugins)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(EngineArgs, "create_engine_config", _checked_config)
    _wrap(BaseModelLoader, "load_model", _patched_load)
    _wrap(InputProcessor, "process_inputs", _strength_salted)
    _wrap(GPUModelRunner, "_prepare_inputs", _strengths_filled)
    _hook_server()


def _hook_server():
    """In the OpenAI server's process (its app module already imported): the request check
    goes into the app's middleware. Elsewhere (LLM(), engine, workers) nothing is imported."""
    app_module = sys.modules.get(_APP_MODULE)
    if app_module is not None and hasattr(app_module, "init_entrypoints_middleware"):
        _wrap(app_module, "init_entrypoints_middleware", _request_check_added)


# ------------------------------------------------------------------ front end: start-up

def _checked_config(original):
    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        settings = read_settings(config.additional_config)
        if settings is None:
            return config
        targets = check_for_serving(config.model_config.hf_config, settings)
        if settings.per_request and config.use_v2_model_runner:
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                raise ValueError("sgm_ext per_request needs vLLM's V1 model runner: set "
                                 "VLLM_USE_V2_MODEL_RUNNER=0")
        digest = file_sha256(settings.scales)
        _WATCHES[settings.scales, digest] = ScaleFileWatch(settings.scales, digest)
        _hook_server()
        entry = config.additional_config[SETTINGS_KEY]
        if entry.get("scales_sha256") not in (None, digest):
            raise ValueError(f"{settings.scales}: its content hash is {digest}, not the "
                             f"scales_sha256 given ({entry['scales_sha256']})")
        entry.update(scales=settings.scales, scales_sha256=digest)
        parallel = config.parallel_config
        if not parallel.worker_extension_cls:
            parallel.worker_extension_cls = WORKER_EXTENSION
        sites = sum(len(t.scales) for t in targets)
        log.info("sgm-ext: serving %s (%d sites on %d MLPs, strength %s%s)", settings.scales,
                 sites, len(targets), settings.strength,
                 ", per request" if settings.per_request else "")
        return config

    return create_engine_config


# ------------------------------------------------------------------ workers: the patch

def _patched_load(original):
    def load_model(self, vllm_config, model_config, prefix=""):
        model = original(self, vllm_config, model_config, prefix)
        settings = read_settings(vllm_config.additional_config)
        if settings is None or prefix:  # prefix: a draft or sub-model
            return model
        pause_point("worker-load")  # tests: the file changed between the check and here
        if file_state(settings.scales, settings.scales_sha256) != "as loaded":
            raise ValueError(f"{settings.scales} changed on disk while vLLM was starting (its "
                             "content is not the one checked at start-up): nothing was "
                             "served; start the server again")
        targets = check_for_serving(model_config.hf_config, settings)
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        served = patch_vllm_model(
            model, targets, settings, mapper=None if mapper is None else mapper.map_name,
            max_tokens=(vllm_config.scheduler_config.max_num_batched_tokens
                        if settings.per_request else 0),
            dtype=model_config.dtype)
        model.__dict__[_SERVED_ATTR] = served
        rank, size = _tp_rank()
        log.info("sgm-ext: rank %d/%d patched %d sites on %d modules: %s", rank, size,
                 len(served.lines), len(served.modules),
                 ", ".join(f"{site} -> {path} ({n})" for site, path, n in served.lines))
        return model

    return load_model


def _tp_rank():
    try:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # no parallel groups (a model loaded outside an engine)
        return 0, 1


def served_of(model):
    """The serving.ServedModel a vLLM model was patched with, or None."""
    return None if model is None else model.__dict__.get(_SERVED_ATTR)


# ------------------------------------------------------------------ per request

def _strength_salted(original):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        settings = read_settings(self.vllm_config.additional_config)
        strength = None
        if settings is not None:
            _log_file_news(settings)
            try:
                strength = request_strength(getattr(params, "extra_args", None), settings)
            except (ValueError, TypeError) as e:  # vLLM answers its own error type with a 400
                from vllm.exceptions import VLLMValidationError

                raise VLLMValidationError(str(e), parameter=REQUEST_KEY) from None
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if settings is not None and settings.per_request:
            mark = "default" if strength is None else repr(strength)
            request.cache_salt = f"{request.cache_salt or ''}|{REQUEST_KEY}={mark}"
        return request

    return process_inputs


def _log_file_news(settings):
    """At each request: a warning, once per change, when the scale file on disk is no longer
    the one served."""
    if not settings.scales_sha256:
        return
    key = (settings.scales, settings.scales_sha256)
    watch = _WATCHES.get(key)
    if watch is None:  # a front end that did not configure the engine: hash at the first look
        watch = _WATCHES[key] = ScaleFileWatch(*key, signature=None)
    news = watch.news()
    if news:
        log.warning(news)


# ------------------------------------------------------------------ the OpenAI server

def _request_check_added(original):
    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        config = getattr(args, "additional_config", None)
        try:
            settings = read_settings(json.loads(config) if isinstance(config, str) else config)
        except ValueError:
            settings = None  # the engine's configuration says what is wrong
        if settings is not None:  # first: innermost, after vLLM's own (CORS, API key)
            app.add_middleware(RequestCheck)
        return original(args, app, *rest, **kwargs)

    return init_entrypoints_middleware


class RequestCheck:
    """ASGI middleware: a JSON POST body with a misplaced sgm_* key or a strength that is not
    a number in [0, 1] (as the client wrote it: vLLM's request models turn true into 1 and
    answer null with four validation errors) gets one 400 line naming vllm_xargs.sgm_strength;
    any other body goes on to vLLM unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body) if body.lstrip()[:1] == b"{" else None
        except ValueError:  # not JSON: vLLM answers it
            data = None
        problem = request_body_problem(data)
        if problem:
            payload = json.dumps({"error": {"message": problem, "type": "BadRequestError",
                                            "param": REQUEST_PLACE, "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _strengths_filled(original):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        served = served_of(self.get_model())
        if served is not None and served.token_strength is not None:
            strengths = []
            for request_id in self.input_batch.req_ids:
                params = self.requests[request_id].sampling_params
                extra = (getattr(params, "extra_args", None) or {}) if params else {}
                value = extra.get(REQUEST_KEY)  # checked by process_inputs
                strengths.append(None if value is None else float(value))
            served.fill_token_strengths(strengths, num_scheduled_tokens[: len(strengths)])
        return out

    return _prepare_inputs


# ------------------------------------------------------------------ at run time

class WorkerExtension:
    """Methods vLLM adds to each worker (worker_extension_cls; set by the plugin when none is
    given); called through LLM.collective_rpc. Use set_strength / describe below."""

    def _sgm_served(self):
        served = served_of(self.model_runner.get_model())
        if served is None:
            raise ValueError("this vLLM model is not served with sgm-ext scales "
                             f"(additional_config={{{SETTINGS_KEY!r}: {{'scales': ...}}}})")
        return served

    def sgm_set_strength(self, value):
        return self._sgm_served().set_strength(value)

    def sgm_describe(self):
        served = self._sgm_served()
        rank, size = _tp_rank()
        settings = served.settings
        return {"rank": rank, "tp_size": size, "scales": settings.scales,
                "scales_sha256": settings.scales_sha256,
                "scales_on_disk": file_state(settings.scales, settings.scales_sha256),
                "note": KEEPS_LOADED,
                "strength": served.default, "per_request": served.token_strength is not None,
                "sites": [list(line) for line in served.lines],
                "modules": sorted({type(m).__name__ for m in served.modules})}

    def sgm_patch(self, *args, **kwargs):
        raise ValueError("a running vLLM model cannot be patched: its compiled graph would "
                         "ignore the change. Give the scales at start-up (additional_config="
                         f"{{{SETTINGS_KEY!r}: {{'scales': ...}}}}); change the strength with "
                         "sgm_ext.vllm_plugin.set_strength")


def set_strength(llm, value: float) -> float:
    """One strength for every request from now on (the default of requests that set none, in
    per-request mode), on every worker, in place; then vLLM's prefix cache is emptied, since
    its blocks were computed at the old strength."""
    value = check_strength(value, per_sequence=False)
    llm.collective_rpc("sgm_set_strength", args=(value,))
    llm.reset_prefix_cache()
    return value


def describe(llm) -> list:
    """One dict per worker: rank, scales, scales_sha256 (the content served), scales_on_disk
    ("as loaded", "changed", "missing": a running server keeps the scales it loaded; note says
    so), strength, per_request, sites (site, vLLM module, neurons on that rank), the module
    classes patched in."""
    return llm.collective_rpc("sgm_describe")
