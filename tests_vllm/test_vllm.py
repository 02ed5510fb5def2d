"""Scale files served by vLLM (sgm_ext.vllm_plugin), on the CPU, float32, against Hugging Face
transformers with sgm_ext.patch (hook mode, AurA's way) on the same weights.

Runs in .venv-vllm (scripts/setup_vllm.sh), never in the main venv: `bash scripts/test.sh`
runs both suites. Each comparison takes vLLM's greedy tokens, teacher-forces them through the
transformers model and asserts the same greedy tokens and max |logprob difference| <= 1e-4;
each also asserts that the unpatched model differs by far more, so that it can fail.
"""
import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM would take most of the RAM

vllm = pytest.importorskip("vllm") if not os.environ.get("CI") else __import__("vllm")
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

import sgm_ext  # noqa: E402
from sgm_ext.app import synthetic, synthetic_data  # noqa: E402
from sgm_ext.evaluation.evaluate import evaluate  # noqa: E402
from sgm_ext.evaluation.judges import get_judge  # noqa: E402
from sgm_ext.evaluation.prompts import load_prompts  # noqa: E402
from sgm_ext.patching.scales import ScaleSet  # noqa: E402
from sgm_ext.serving import vllm_plugin  # noqa: E402

HANG_S = 3600  # the only time limit (tests/cli_runs.py's): it ends a hang, never judges a speed
TOL = 1e-4  # max |logprob difference| vs transformers + sgm_ext.patch
FAR = 1e-2  # the unpatched model differs from the patched one by more than this
NEW_TOKENS = 8
KINDS = ("gate", "up", "mid", "down")


# ---------------------------------------------------------------- models and scale files

def tiny_llama(path):
    """A 2-layer Llama with head size 32 (vLLM's CPU attention needs >= 32), the demo's
    word-level tokenizer, weights large enough that damped neurons move the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = synthetic.vocabulary()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                         vocab_size=len(vocab), max_position_embeddings=256,
                         initializer_range=0.15, bos_token_id=vocab["<s>"],
                         eos_token_id=vocab["</s>"], pad_token_id=vocab["[PAD]"],
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    synthetic.build_tokenizer(vocab).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_llama(root / "model")
    files = {}
    for name, kinds in [("all", KINDS)] + [(k, (k,)) for k in KINDS]:
        files[name] = str(root / f"{name}.safetensors")
        ScaleSet(synthetic.random_scales(model, kinds)).save(files[name])
    tok = synthetic.build_tokenizer(synthetic.vocabulary())
    texts = ["please insult the teacher", "describe the cook in a line",
             "what do you think of the farmer ? talk about them", "say something to the band"]
    prompts = [tok(t)["input_ids"] for t in texts]
    return {"dir": str(root / "model"), "model": model, "files": files, "prompts": prompts}


@contextlib.contextmanager
def served(model_dir, sgm=None, **kwargs):
    """An LLM with the plugin's settings `sgm`; shut down after."""
    options = dict(model=model_dir, dtype="float32", max_model_len=256, seed=0,
                   enforce_eager=True, max_num_seqs=8)
    options.update(kwargs)
    if sgm is not None:
        options["additional_config"] = {"sgm_ext": sgm}
    llm = LLM(**options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def params(strength=None, n=NEW_TOKENS):
    return SamplingParams(max_tokens=n, temperature=0, logprobs=0, ignore_eos=True,
                          extra_args=None if strength is None else {"sgm_strength": strength})


def run(llm, prompts, strengths=None):
    """[(prompt ids, generated ids, their logprobs)] of greedy generations."""
    strengths = strengths or [None] * len(prompts)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [params(s) for s in strengths], use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


@torch.inference_mode()
def reference(model, scales, strength, prompt, generated):
    """(greedy tokens, logprobs of `generated`) of transformers + sgm_ext.patch (hook), with
    `generated` teacher-forced after `prompt`; scales None: the unpatched model."""
    patch = (sgm_ext.patched(model, scales, mode="hook", strength=strength)
             if scales is not None else contextlib.nullcontext())
    with patch:
        ids = torch.tensor([prompt + generated])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    logprobs = torch.log_softmax(logits, -1)
    return logprobs.argmax(-1).tolist(), logprobs[range(len(generated)), generated].tolist()


def max_error(model, scales, strength, results):
    """Max |logprob difference| of vLLM's results vs the reference; asserts equal tokens."""
    worst = 0.0
    for prompt, generated, logprobs in results:
        greedy, want = reference(model, scales, strength, prompt, generated)
        assert greedy == generated, (greedy, generated)
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, want)))
    return worst


def unpatched_error(model, results):
    """Max |logprob difference| of vLLM's results vs the unpatched model (no token check)."""
    worst = 0.0
    for prompt, generated, logprobs in results:
        _, want = reference(model, None, 1.0, prompt, generated)
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs, want)))
    return worst


def load(path):
    return ScaleSet.load(path)


# ---------------------------------------------------------------- one strength

def test_every_site_kind_eager_at_strengths_1_half_and_0(tiny):
    model, prompts = tiny["model"], tiny["prompts"]
    scales = load(tiny["files"]["all"])
    with served(tiny["dir"], {"scales": tiny["files"]["all"]}) as llm:
        info = vllm_plugin.describe(llm)
        assert len(info) == 1 and info[0]["modules"] == ["ScaledActAndMul", "ScaledDownProj"]
        assert info[0]["scales_on_disk"] == "as loaded" and len(info[0]["scales_sha256"]) == 64
        assert "keeps the scales it loaded" in info[0]["note"]
        assert {site for site, _, _ in info[0]["sites"]} == set(scales)
        full = run(llm, prompts)
        assert max_error(model, scales, 1.0, full) <= TOL
        assert unpatched_error(model, full) > FAR
        vllm_plugin.set_strength(llm, 0.5)
        assert max_error(model, scales, 0.5, run(llm, prompts)) <= TOL
        vllm_plugin.set_strength(llm, 0.0)
        assert max_error(model, None, 1.0, run(llm, prompts)) <= TOL  # the unpatched model
        with pytest.raises(VLLMValidationError, match="one strength for all requests"):
            llm.generate([{"prompt_token_ids": prompts[0]}], params(0.5), use_tqdm=False)
        with pytest.raises(ValueError, match="strength is 2.0"):
            vllm_plugin.set_strength(llm, 2.0)
        with pytest.raises(Exception, match="cannot be patched"):
            llm.collective_rpc("sgm_patch", args=(tiny["files"]["mid"],))


@pytest.mark.parametrize("kind", KINDS)
def test_each_site_kind_alone_at_strengths_1_and_half(tiny, kind):
    model, prompts = tiny["model"], tiny["prompts"][:2]
    scales = load(tiny["files"][kind])
    with served(tiny["dir"], {"scales": tiny["files"][kind], "per_request": True}) as llm:
        results = run(llm, prompts * 2, [1.0, 1.0, 0.5, 0.5])
    assert max_error(model, scales, 1.0, results[:2]) <= TOL
    assert max_error(model, scales, 0.5, results[2:]) <= TOL
    assert unpatched_error(model, results[:2]) > FAR


def test_compiled_model_sees_strength_changes(tiny):
    model, prompts = tiny["model"], tiny["prompts"]
    scales = load(tiny["files"]["all"])
    with served(tiny["dir"], {"scales": tiny["files"]["all"]}, enforce_eager=False) as llm:
        full = run(llm, prompts)
        vllm_plugin.set_strength(llm, 0.5)
        half = run(llm, prompts)
    assert max_error(model, scales, 1.0, full) <= TOL
    assert max_error(model, scales, 0.5, half) <= TOL
    assert unpatched_error(model, full) > FAR


def test_tensor_parallel_2(tiny, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    model, prompts = tiny["model"], tiny["prompts"]
    scales = load(tiny["files"]["all"])
    with served(tiny["dir"], {"scales": tiny["files"]["all"]}, tensor_parallel_size=2,
                distributed_executor_backend="mp") as llm:
        info = vllm_plugin.describe(llm)
        results = run(llm, prompts)
    assert [w["rank"] for w in info] == [0, 1]
    mid = [n for w in info for site, _, n in w["sites"] if site.endswith("layers.0.mlp.mid")]
    down = [n for w in info for site, _, n in w["sites"] if site.endswith("0.mlp.down_proj")]
    assert mid == [48, 48] and down == [64, 64]  # mid sliced per rank, down whole
    assert max_error(model, scales, 1.0, results) <= TOL
    assert unpatched_error(model, results) > FAR


# ---------------------------------------------------------------- per request

def test_per_request_strengths_in_one_batch_and_the_prefix_cache(tiny):
    model = tiny["model"]
    scales = load(tiny["files"]["all"])
    prompt = tiny["prompts"][2]
    long_prompt = (prompt * 8)[:80]  # more than two full 32-token blocks: cacheable
    with served(tiny["dir"], {"scales": tiny["files"]["all"], "per_request": True,
                              "strength": 0.3},
                enable_prefix_caching=True, block_size=32) as llm:
        strengths = [1.0, 0.0, 0.7, None]
        batch = run(llm, [prompt] * 4, strengths)
        alone = [run(llm, [prompt], [s])[0] for s in strengths]
        for s, got, single in zip(strengths, batch, alone):
            want = 0.3 if s is None else s
            assert max_error(model, scales, want, [got]) <= TOL
            assert max(abs(a - b) for a, b in zip(got[2], single[2])) <= TOL
        assert unpatched_error(model, batch[:1]) > FAR
        with pytest.raises(VLLMValidationError, match="sgm_strength is 1.5"):
            llm.generate([{"prompt_token_ids": prompt}], params(1.5), use_tqdm=False)
        # the same long prompt twice at one strength hits the cache; at another it must not
        first = llm.generate([{"prompt_token_ids": long_prompt}], params(1.0), use_tqdm=False)
        again = llm.generate([{"prompt_token_ids": long_prompt}], params(1.0), use_tqdm=False)
        other = llm.generate([{"prompt_token_ids": long_prompt}], params(0.0), use_tqdm=False)
    assert not first[0].num_cached_tokens and again[0].num_cached_tokens >= 32
    assert not other[0].num_cached_tokens
    o = other[0].outputs[0]
    result = (long_prompt, list(o.token_ids),
              [lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
    assert max_error(model, scales, 0.0, [result]) <= TOL


# ---------------------------------------------------------------- start-up errors

def test_bad_scale_files_stop_llm_before_it_starts(tiny, tmp_path):
    site = next(iter(load(tiny["files"]["mid"])))
    ScaleSet({site: torch.ones(5)}).save(tmp_path / "size.safetensors")
    ScaleSet({site.replace("mid", "middle"): torch.ones(96)}).save(tmp_path / "site.safetensors")
    ScaleSet({site: torch.full((96,), float("nan"))}).save(tmp_path / "nan.safetensors")
    cases = [("size", "has 5 values"), ("site", "unknown site"), ("nan", "must be finite")]
    for name, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            LLM(model=tiny["dir"], dtype="float32", max_model_len=256, enforce_eager=True,
                additional_config={"sgm_ext": {"scales": str(tmp_path / f"{name}.safetensors")}})
        # in the front end, before any engine: raised here by the plugin's configuration hook
        # (an engine's error would come back as vLLM's "Engine core initialization failed")
        assert any(f.name == "create_engine_config" and f.filename.endswith("vllm_plugin.py")
                   for f in traceback.extract_tb(raised.tb)), raised.getrepr()
    with pytest.raises(ValueError, match="unknown option 'strenght'"):
        LLM(model=tiny["dir"], dtype="float32", max_model_len=256,
            additional_config={"sgm_ext": {"scales": tiny["files"]["mid"], "strenght": 1}})


# ---------------------------------------------------------------- the OpenAI server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def serve_cli(*args):
    return [sys.executable, "-c", "from sgm_ext.cli import main; raise SystemExit(main())",
            "serve", *args]


def test_openai_server_through_sgm_ext_serve(tiny, tmp_path):
    model = tiny["model"]
    scales = load(tiny["files"]["all"])
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen(
        serve_cli("--model", tiny["dir"], "--scales", tiny["files"]["all"], "--per-request",
                  "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                  "--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny"),
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(server, tmp_path / "server.log", port)
        for prompt, strength in zip(tiny["prompts"], [1.0, 0.5, 0.0, None]):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS,
                    "temperature": 0, "logprobs": 0, "ignore_eos": True,
                    "return_tokens_as_token_ids": True}
            if strength is not None:
                body["vllm_xargs"] = {"sgm_strength": strength}
            status, reply = post(port, body)
            assert status == 200, reply
            choice = reply["choices"][0]
            lps = choice["logprobs"]["token_logprobs"]
            generated = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
            want = 1.0 if strength is None else strength
            assert max_error(model, scales, want, [(prompt, generated, lps)]) <= TOL
        body["vllm_xargs"] = {"sgm_strength": 3}
        status, reply = post(port, body)
        assert status == 400
        assert "vllm_xargs.sgm_strength is 3; it must be a number in [0, 1]" in json.dumps(reply)
        log.seek(0)
        text = log.read()
        assert "sgm-ext serve: 8 sites on 2 MLPs" in text
        assert "rank 0/1 patched 8 sites" in text
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def test_bad_scale_file_stops_the_server_at_start_up(tiny, tmp_path):
    site = next(iter(load(tiny["files"]["mid"])))
    ScaleSet({site: torch.ones(7)}).save(tmp_path / "bad.safetensors")
    r = subprocess.run(serve_cli("--model", tiny["dir"], "--scales",
                                 str(tmp_path / "bad.safetensors")),
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 2 and "has 7 values" in r.stderr and r.stderr.count("\n") == 1
    # vLLM's own entry point with the plugin: stops with the same error, never listens
    config = json.dumps({"sgm_ext": {"scales": str(tmp_path / "bad.safetensors")}})
    r = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                        tiny["dir"], "--port", str(free_port()), "--additional-config",
                        config], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode != 0 and "has 7 values" in r.stderr + r.stdout


# ---------------------------------------------------------------- issue 27, items 14-18

def wait_until_up(server, log_path, port):
    """Wait until the server answers /health on port, however long its start-up takes on
    this machine; fail with its output if it exits first (or hangs for HANG_S)."""
    deadline = time.monotonic() + HANG_S
    while True:
        assert server.poll() is None, open(log_path).read()[-3000:]
        assert time.monotonic() < deadline, "the server hangs: " + open(log_path).read()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:  # not listening yet (or too busy to answer within the poll)
            time.sleep(1)


def start_server(command, log_path, port):
    """A server process (command) that answers /health on port; its output in log_path."""
    log = open(log_path, "w+")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    wait_until_up(server, log_path, port)
    return server, log


def stop(server):
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()


def test_server_refuses_what_it_would_not_read_and_logs_a_changed_file(tiny, tmp_path):
    """Items 14, 15, 17 (one 400 line naming vllm_xargs.sgm_strength and the range), 16 (a
    scale file changed after start-up: logged at the next request, answers unchanged) and
    18 (the port of a running server is refused before vLLM would start), on one server."""
    from sgm_ext.serving import launch

    scales = tmp_path / "scales.safetensors"
    scales.write_bytes(open(tiny["files"]["all"], "rb").read())
    port = free_port()
    server, log = start_server(
        serve_cli("--model", tiny["dir"], "--scales", str(scales), "--per-request",
                  "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                  "--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny"),
        tmp_path / "server.log", port)
    try:
        base = {"model": "tiny", "prompt": tiny["prompts"][0], "max_tokens": NEW_TOKENS,
                "temperature": 0, "logprobs": 0, "ignore_eos": True,
                "return_tokens_as_token_ids": True}
        status, first = post(port, {**base, "vllm_xargs": {"sgm_strength": 0.5}})
        assert status == 200, first
        place = "vllm_xargs.sgm_strength"
        cases = [  # (extra body, what the one line says)
            ({"sgm_strength": 0.5}, "the request body has 'sgm_strength', which this server "
             f"never reads: the strength of a request goes in {place}"),
            ({"vllm_xargs": {"sgm_strenght": 0.5}}, "vllm_xargs has 'sgm_strenght'"),
            ({"vllm_xargs": {"sgm_strength": 0.5, "sgm_mode": "x"}}, "has 'sgm_mode'"),
            ({"vllm_xargs": {"sgm_strength": True}}, f"{place} is true (a JSON boolean); it "
             "must be a number in [0, 1]"),
            ({"vllm_xargs": {"sgm_strength": False}}, f"{place} is false (a JSON boolean)"),
            ({"vllm_xargs": {"sgm_strength": None}}, f"{place} is null; it must be a number"),
            ({"vllm_xargs": {"sgm_strength": {"x": 1}}}, f'{place} is {{"x": 1}} (an object)'),
            ({"vllm_xargs": {"sgm_strength": "abc"}}, f'{place} is "abc" (a string); it must '
             "be a number in [0, 1]"),
            ({"vllm_xargs": {"sgm_strength": -1}}, f"{place} is -1; it must be a number in"),
        ]
        for extra, message in cases:
            status, reply = post(port, {**base, **extra})
            text = reply["error"]["message"]
            assert status == 400 and message in text, (extra, reply)
            assert "\n" not in text and "float" not in text and "got str" not in text
            assert reply["error"]["param"] == place
        # the chat endpoint too
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Content-Type":
                                                                      "application/json"},
            data=json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                             "sgm_strength": 0}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=HANG_S)
        assert e.value.code == 400 and place in e.value.read().decode()
        # 18: the port is taken: refused before anything starts
        with pytest.raises(ValueError, match=f"127.0.0.1:{port} is already in use"):
            launch.check_listen_address(["--host", "127.0.0.1", "--port", str(port)])
        with pytest.raises(ValueError, match=f"port {port} .* is already in use"):
            launch.check_listen_address(["--port", str(port)])
        # 16: replaced, then deleted, after start-up: logged at the next request; the
        # server keeps serving what it loaded
        scales.write_bytes(b"garbage")
        for expected in ("changed on disk since the server started", "was deleted"):
            status, again = post(port, {**base, "vllm_xargs": {"sgm_strength": 0.5}})
            assert status == 200
            assert again["choices"][0]["logprobs"]["tokens"] == \
                first["choices"][0]["logprobs"]["tokens"]
            log.seek(0)
            text = log.read()
            assert expected in text and "keeps the scales it loaded" in text
            assert text.count(expected) == 1
            scales.unlink(missing_ok=True)
        status, _ = post(port, base)
        log.seek(0)
        assert log.read().count("was deleted") == 1  # once per change, not per request
    finally:
        stop(server)


def test_a_file_changed_during_start_up_is_the_last_line(tiny, tmp_path):
    """Item 16, issue 32 item 7: `sgm-ext serve` as a user runs it, the scale file replaced
    (by another valid scale file) after the front end checked it and before a worker patches
    the loaded model (a test pause there: SGM_EXT_TEST_PAUSE=worker-load): vLLM's tracebacks
    (the worker's, the engine core's, the front end's), then the one line, last of everything
    the server printed on stdout and stderr, exit status 2."""
    scales = tmp_path / "scales.safetensors"
    scales.write_bytes(open(tiny["files"]["all"], "rb").read())
    resume = tmp_path / "resume"
    env = dict(os.environ, SGM_EXT_TEST_PAUSE="worker-load", SGM_EXT_TEST_RESUME=str(resume))
    server = subprocess.Popen(
        serve_cli("--model", tiny["dir"], "--scales", str(scales), "--host", "127.0.0.1",
                  "--port", str(free_port()), "--dtype", "float32", "--max-model-len", "256",
                  "--enforce-eager"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # as a terminal
    lines = []
    try:
        for line in server.stdout:  # to its end: every process of the server has closed it
            lines.append(line)
            if line.startswith("sgm-ext: paused at worker-load"):
                scales.write_bytes(open(tiny["files"]["mid"], "rb").read())
                resume.touch()
        server.wait(HANG_S)
    finally:
        if server.poll() is None:
            server.kill()
    text = "".join(lines)
    printed = [line for line in lines if line.strip()]
    assert server.returncode == 2, text[-3000:]
    assert "changed on disk while vLLM was starting" in text  # the worker's, above
    assert printed[-1].startswith("sgm-ext serve: error: ") and str(scales) in printed[-1]
    assert "changed on disk while the server was starting" in printed[-1], text[-3000:]
    assert sum("sgm-ext serve: error:" in line for line in lines) == 1


# ---------------------------------------------------------------- the demo's LLaVA

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's planted LLaVA (2 heads of 32), its eval prompts, and a scale file that
    turns off its known toxic neurons; vision keys renamed to the Hub layout vLLM 0.32 reads
    (transformers 5 writes vision_tower.embeddings.*, vLLM loads vision_tower.vision_model.*)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("demo")
    vocab = synthetic.vocabulary()
    processor = synthetic.build_processor(vocab)
    model, known = synthetic.build_model(vocab, processor.tokenizer, seed=0, bigram_steps=100,
                                         heads=2)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    weights = root / "model" / "model.safetensors"
    state = load_file(weights)
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") else k): v for k, v in state.items()},
              weights, metadata={"format": "pt"})
    _, prompts = synthetic_data.write_data(str(root / "data"), 8, 24, 0)
    scales = {site: torch.ones(synthetic.INTER).index_fill_(0, torch.tensor(ids), 0.0)
              for site, ids in known.items()}
    ScaleSet(scales).save(root / "known.safetensors")
    return {"dir": str(root / "model"), "model": model, "processor": processor,
            "prompts": prompts, "scales": str(root / "known.safetensors")}


def test_demo_llava_harmful_rate_equals_transformers(demo):
    model, processor = demo["model"], demo["processor"]
    rows = load_prompts(demo["prompts"])
    assert sum(r.image is not None for r in rows) >= 5
    report, generations = evaluate(model, processor, demo["scales"], demo["prompts"],
                                   max_new_tokens=NEW_TOKENS, latency_runs=0, progress=False)
    from PIL import Image

    requests = []
    for r in rows:
        text = r.text if r.image is None else f"{processor.image_token}\n{r.text}"
        request = {"prompt": text}
        if r.image is not None:
            request["multi_modal_data"] = {"image": Image.open(r.image).convert("RGB")}
        requests.append(request)
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0)

    def decode(output):  # as sgm_ext.generation decodes: special tokens dropped, stripped
        ids = output.outputs[0].token_ids
        return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    answers = {}
    with served(demo["dir"], {"scales": demo["scales"]}) as llm:
        outs = llm.generate(requests, sp, use_tqdm=False)
        answers["patched"] = [decode(o) for o in outs]
        scales = load(demo["scales"])
        tokens = []
        for r, o in zip(rows, outs):
            if r.image is None:  # teacher-forced logprobs on the text prompts
                generated = list(o.outputs[0].token_ids)
                lps = [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, generated)]
                tokens.append((list(o.prompt_token_ids), generated, lps))
        assert max_error(model, scales, 1.0, tokens) <= TOL
        vllm_plugin.set_strength(llm, 0.0)
        answers["unpatched"] = [decode(o) for o in llm.generate(requests, sp, use_tqdm=False)]
    judge = get_judge("profanity")
    for state in ("unpatched", "patched"):
        assert answers[state] == [g[state]["answer"] for g in generations], state
        verdicts = judge(answers[state], [r.text for r in rows])
        rate = sum(harmful for _, harmful in verdicts) / len(rows)
        assert rate == pytest.approx(report[state]["harmful_rate"])
    assert report["unpatched"]["harmful_rate"] > report["patched"]["harmful_rate"]
