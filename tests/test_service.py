"""The sub-agent generation service (train/service.py): its answers against the local sampler, its validation
and failure isolation, slow clients, a dead worker, /v1/completions through the official `openai` client, and
the client's checks of what it receives (RemoteSubPolicy)."""
import http.server
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest
from flax import nnx

from mgrpo_jax.models import ModelConfig, init_model
from mgrpo_jax.rollout.controller import Controller, ControllerConfig, TextCodec, ToolSet
from mgrpo_jax.rollout.protocol import ProtocolConfig
from mgrpo_jax.rollout.sampler import Sampler, SamplerConfig
from mgrpo_jax.train.service import (MAX_SEED, GenerationService, InvalidServiceResponseError, RemoteSubPolicy,
                                     ServedSample, ServiceUnavailableError, TokenizerMismatchError, WorkerDeadError,
                                     tokenizer_fingerprint)
from redis_server import free_port
from rollout_fixtures import ScriptedPolicy, tokenizer, tools

MODEL = "mgrpo_jax-sub"


def _model_config(vocab_size):
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, architecture="qwen3", qk_norm=True)


@pytest.fixture(scope="module")
def sampler_and_params():
    cfg = _model_config(len(tokenizer()))
    graphdef, state = nnx.split(init_model(cfg, seed=3))
    sampler = Sampler(graphdef, cfg, SamplerConfig(batch_size=8, max_new_tokens=6, prompt_buckets=(16,),
                                                   eos_ids=(1,), pad_id=0, overflow="error"))
    return sampler, state


def _post(url, path, body, timeout=60):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url, path, timeout=30):
    try:
        with urllib.request.urlopen(url + path, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _local(sampler, params, rows, seed, stops=()):
    return sampler.generate(params, rows, jax.random.key(seed), [list(s) for s in stops])


# ---------------------------------------------------------------------------------------- serving


def test_service_matches_the_local_sampler_batches_concurrent_requests_and_reports_health(sampler_and_params):
    sampler, params = sampler_and_params
    prompts, stops = [[5, 9, 2], [7, 1, 3, 3, 8]], [[4, 4]]
    with GenerationService(sampler, params, 7, batch_window_s=0.3) as service:
        client = RemoteSubPolicy(service.url, max_new_tokens=6, max_prompt_tokens=16, deadline_s=30)
        health = client.health()
        assert health["status"] == "ok" and health["policy_version"] == 7 and health["max_new_tokens"] == 6
        assert client.version == 7

        # One request alone: exactly what the local sampler gives for the same seed.
        rng = jax.random.key(11)
        remote = client.generate(prompts, rng, stops)
        seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
        local = _local(sampler, params, prompts, seed, stops)
        for r, loc in zip(remote, local):
            np.testing.assert_array_equal(r.tokens, loc.tokens)
            np.testing.assert_array_equal(r.logprobs, loc.logprobs)
            assert r.finish_reason == loc.finish_reason and r.policy_version == 7
        assert len(remote[0].tokens) >= 1

        # Concurrent requests are merged into fewer sampler batches; each gets its own rows back.
        before_req, before_batches = service.requests, service.batches
        results = {}

        def ask(i):
            results[i] = client.generate([[3 + i, 5, 7]] * (1 + i % 2), jax.random.key(i), stops)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == list(range(6))
        assert [len(results[i]) for i in range(6)] == [1 + i % 2 for i in range(6)]
        for samples in results.values():
            for s in samples:
                assert 1 <= len(s.tokens) == len(s.logprobs) <= 6 and np.all(s.logprobs <= 0)
                assert s.finish_reason in ("length", "eos", "stop")
        assert service.requests - before_req == 6
        assert service.batches - before_batches < 6, "concurrent requests were not merged"

        # New weights: served with the new version (and a copy: the caller may donate its buffers).
        new = jax.tree.map(lambda x: x * 2.0, params)
        service.set_weights(new, 8)
        jax.tree.map(lambda x: x.delete(), new)  # as a donating update would
        assert client.generate(prompts, rng, stops)[0].policy_version == 8
        assert client.version == 8 and client.health()["policy_version"] == 8
        with pytest.raises(ValueError, match="400"):
            client.generate([[]], rng, stops)  # an empty prompt: refused, no retries


# ------------------------------------------------------------------------ validation and isolation


def test_a_seed_out_of_range_is_a_400_and_the_service_keeps_serving(sampler_and_params):
    """seed=2**70 used to kill the generation thread (jax.random.key outside the try): every later request
    waited for its timeout and got a 503, while /health said ok."""
    sampler, params = sampler_and_params
    with GenerationService(sampler, params, 0, request_timeout_s=5) as service:
        for seed in (2**70, -1, MAX_SEED + 1, 1.5, True):
            code, out = _post(service.url, "/generate", {"prompts": [[5, 6]], "seed": seed})
            assert code == 400 and "seed" in out["error"] and out["param"] == "seed", (seed, out)
        code, out = _post(service.url, "/generate", {"prompts": [[5, 6]], "seed": MAX_SEED})
        assert code == 200
        local = _local(sampler, params, [[5, 6]], MAX_SEED)
        assert out["samples"][0]["tokens"] == local[0].tokens.tolist()
        code, health = _get(service.url, "/health")
        assert code == 200 and health["status"] == "ok" and health["requests"] == 1


@pytest.mark.parametrize("bad, field, message", [
    ({"prompts": [[3] * 17]}, "prompts", "more than the largest prompt bucket 16"),
    ({"prompts": [[3, 10**6]]}, "prompts", r"prompts\[0\]\[1\] = 1000000 is outside the vocabulary \[0, 600\)"),
    ({"prompts": [[-1]]}, "prompts", "outside the vocabulary"),
    ({"prompts": [[3, 2.0]]}, "prompts", "is not an integer token id"),
    ({"prompts": [[3]], "stop_sequences": [[4] * 9]}, "stop_sequences", "max_stop_tokens=8"),
    ({"prompts": [[3]], "stop_sequences": [[4]] * 9}, "stop_sequences", "max_stop_sequences=8"),
    ({"prompts": [[3]], "stop_sequences": [[700]]}, "stop_sequences", "outside the vocabulary"),
])
def test_a_bad_request_fails_alone_while_merged_good_requests_succeed(sampler_and_params, bad, field, message):
    """One prompt over the largest bucket used to turn every request merged with it into a 400."""
    sampler, params = sampler_and_params
    with GenerationService(sampler, params, 0, batch_window_s=0.5, request_timeout_s=30) as service:
        answers = {}

        def ask(i, body):
            answers[i] = _post(service.url, "/generate", {"seed": i, **body})

        bodies = [{"prompts": [[3 + i, 5]]} for i in range(6)] + [bad]
        threads = [threading.Thread(target=ask, args=(i, b)) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        code, out = answers[6]
        assert code == 400 and out["param"] == field
        assert re.search(message, out["error"]), out
        for i in range(6):
            assert answers[i][0] == 200, answers[i]
            assert len(answers[i][1]["samples"]) == 1


class _FailOn:
    """The real sampler, except that a batch holding a prompt that starts with `marker` raises `error` (a failure
    that no validation can foresee: a device error, a bug)."""

    def __init__(self, inner, marker, error):
        self.inner, self.marker, self.error = inner, marker, error

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, params, prompts, rng, stop_sequences=()):
        if any(p[0] == self.marker for p in prompts):
            raise self.error
        return self.inner.generate(params, prompts, rng, stop_sequences)


def test_a_failing_merged_generation_is_retried_request_by_request(sampler_and_params):
    sampler, params = sampler_and_params
    failing = _FailOn(sampler, 42, RuntimeError("device fell over"))
    with GenerationService(failing, params, 0, batch_window_s=0.5, request_timeout_s=30) as service:
        answers = {}

        def ask(i, first):
            answers[i] = _post(service.url, "/generate", {"prompts": [[first, 5]], "seed": i})

        threads = [threading.Thread(target=ask, args=(i, 42 if i == 3 else 3 + i)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert answers[3][0] == 500 and "device fell over" in answers[3][1]["error"]
        for i in (0, 1, 2, 4):
            assert answers[i][0] == 200, answers[i]
            # Served alone after the merged call failed: exactly the local sampler's answer for its seed.
            assert answers[i][1]["samples"][0]["tokens"] == _local(sampler, params, [[3 + i, 5]], i)[0].tokens.tolist()
        assert service.failed_requests == 1 and service.health()["status"] == "ok"


class _Fatal(BaseException):
    """Escapes `except Exception`, like a fatal error would."""


def test_a_dead_worker_is_reported_by_health_and_answers_503_at_once(sampler_and_params):
    sampler, params = sampler_and_params
    with GenerationService(_FailOn(sampler, 42, _Fatal("out of host memory")), params, 0,
                           request_timeout_s=120) as service:
        assert _post(service.url, "/generate", {"prompts": [[3, 5]]})[0] == 200
        t0 = time.monotonic()
        code, out = _post(service.url, "/generate", {"prompts": [[42, 5]]})
        assert code == 503 and "out of host memory" in out["error"]
        code, health = _get(service.url, "/health")
        assert code == 503 and health["status"] == "dead" and "out of host memory" in health["error"]
        code, out = _post(service.url, "/generate", {"prompts": [[3, 5]]})
        assert code == 503 and "worker" in out["error"]
        assert time.monotonic() - t0 < 30  # not the 120 s request timeout
        with pytest.raises(WorkerDeadError, match="out of host memory"):
            service.check()


def _raw(port, data: bytes, timeout=10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return out
            if not chunk:
                return out
            out += chunk


def test_a_client_that_sends_less_than_its_content_length_times_out(sampler_and_params):
    """It used to hold its connection's thread for ever (no socket timeout)."""
    sampler, params = sampler_and_params
    with GenerationService(sampler, params, 0, client_timeout_s=0.5) as service:
        t0 = time.monotonic()
        out = _raw(service.port, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 100\r\n\r\n{\"prompts\": ")
        assert out.startswith(b"HTTP/1.1 408"), out[:200]
        assert time.monotonic() - t0 < 5
        # An idle connection is closed too, and the service goes on serving.
        t0 = time.monotonic()
        assert _raw(service.port, b"") == b"" and time.monotonic() - t0 < 5
        assert _post(service.url, "/generate", {"prompts": [[3, 5]]})[0] == 200


def test_bodies_that_are_too_large_absent_or_not_json(sampler_and_params):
    sampler, params = sampler_and_params
    with GenerationService(sampler, params, 0, max_body_bytes=1000) as service:
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\n"
        assert _raw(service.port, head + b"Content-Length: 5000\r\n\r\n").startswith(b"HTTP/1.1 413")
        assert _raw(service.port, head + b"\r\n").startswith(b"HTTP/1.1 411")
        out = _raw(service.port, head + b"Content-Length: 3\r\nConnection: close\r\n\r\n{x]")
        assert out.startswith(b"HTTP/1.1 400") and b"not JSON" in out
        assert _post(service.url, "/generate", {"prompts": [[3]], "temperature": 1})[1]["param"] == "temperature"


# ------------------------------------------------------------------------------- /v1/completions


@pytest.fixture(scope="module")
def openai_service(sampler_and_params):
    sampler, params = sampler_and_params
    with GenerationService(sampler, params, 4, tokenizer=tokenizer(), model_name=MODEL) as service:
        client = openai.OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield service, client


def test_openai_client_models_text_usage_and_token_exact_choices(sampler_and_params, openai_service):
    sampler, params = sampler_and_params
    service, client = openai_service
    tok = tokenizer()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL] and client.models.retrieve(MODEL).id == MODEL

    # A string prompt, n=2: the same rows the local sampler draws for the same seed (a request served alone).
    text = "Who founded A?"
    ids = tok.encode(text, add_special_tokens=True)
    out = client.completions.create(model=MODEL, prompt=text, max_tokens=4, n=2, seed=123, logprobs=0)
    local = _local(sampler, params, [ids, ids], 123)
    assert out.id.startswith("cmpl-") and out.model == MODEL and out.object == "text_completion"
    assert [c.index for c in out.choices] == [0, 1]
    for choice, loc in zip(out.choices, local):
        tokens = loc.tokens[:4].tolist()
        assert choice.token_ids == tokens
        assert choice.text == tok.decode(tokens, skip_special_tokens=True)
        np.testing.assert_allclose(choice.logprobs.token_logprobs, loc.logprobs[:4], rtol=1e-6)
        assert choice.logprobs.tokens == [tok.decode([t], skip_special_tokens=False) for t in tokens]
        assert choice.finish_reason == ("length" if len(loc.tokens) > 4 or loc.finish_reason == "length"
                                        else "stop")
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == sum(len(c.token_ids) for c in out.choices)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    # Token-id prompts, two of them with n=2: choices ordered by prompt, then by sample.
    prompts = [[5, 9, 2], [7, 3]]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, seed=7, max_tokens=6)
    local = _local(sampler, params, [prompts[0], prompts[0], prompts[1], prompts[1]], 7)
    assert [c.token_ids for c in out.choices] == [s.tokens.tolist() for s in local]
    assert [c.text for c in out.choices] == [tok.decode(s.tokens.tolist(), skip_special_tokens=True) for s in local]
    assert all(c.logprobs is None for c in out.choices)
    assert out.usage.prompt_tokens == 5


def test_openai_client_streams_the_same_completion(openai_service):
    _, client = openai_service
    whole = client.completions.create(model=MODEL, prompt=[[5, 9, 2], [8, 8]], max_tokens=5, seed=9, logprobs=0)
    chunks = list(client.completions.create(model=MODEL, prompt=[[5, 9, 2], [8, 8]], max_tokens=5, seed=9,
                                            logprobs=0, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in c.token_ids] == choice.token_ids
        assert [x for c in mine for x in c.logprobs.token_logprobs] == choice.logprobs.token_logprobs
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_openai_stop_strings_end_the_text_before_them(openai_service):
    _, client = openai_service
    for seed in range(20):  # a seed whose completion has text to cut (the model is random)
        whole = client.completions.create(model=MODEL, prompt=[5, 9, 2], max_tokens=6, seed=seed).choices[0]
        if len(whole.text) >= 4:
            break
    stop = whole.text[2:4]
    cut = client.completions.create(model=MODEL, prompt=[5, 9, 2], max_tokens=6, seed=seed, stop=[stop, "\x00"])
    choice = cut.choices[0]
    assert choice.text == whole.text[:whole.text.find(stop)] and choice.finish_reason == "stop"
    assert whole.token_ids[:len(choice.token_ids)] == choice.token_ids  # the tokens up to the one completing it
    assert stop in tokenizer().decode(choice.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("kwargs, status, param", [
    ({"temperature": 0.5}, 400, "temperature"),
    ({"top_p": 0.9}, 400, "top_p"),
    ({"max_tokens": 7}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 0}, 400, "n"),
    ({"logprobs": 2}, 400, "logprobs"),
    ({"echo": True}, 400, "echo"),
    ({"suffix": "x"}, 400, "suffix"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"best_of": 3}, 400, "best_of"),
    ({"seed": 2**70}, 400, "seed"),
    ({"extra_body": {"top_k": 5}}, 400, "top_k"),
    ({"prompt": [10**6]}, 400, "prompt"),
    ({"prompt": [[4], [-1]]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [3] * 17}, 400, "prompt"),
    ({"extra_body": {"stop_token_ids": [700]}}, 400, "stop_token_ids"),
    ({"model": "gpt-4"}, 404, "model"),
])
def test_openai_parameters_it_cannot_honour_are_refused_by_name(openai_service, kwargs, status, param):
    _, client = openai_service
    args = {"model": MODEL, "prompt": "Who", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**args)
    assert info.value.status_code == status
    assert info.value.body["param"] == param, info.value.body
    # Values that mean what the service does are accepted.
    ok = client.completions.create(model=MODEL, prompt="Who", max_tokens=2, temperature=1.0, top_p=1.0, n=1,
                                   echo=False, presence_penalty=0, best_of=1, extra_body={"stop_token_ids": [1]})
    assert len(ok.choices) == 1


# ----------------------------------------------------------------------------- the client's checks


class _Canned:
    """A stand-in for a misbehaving server: answers every request with `status`, `body` (bytes) and
    `content_type`; counts requests. (The real service cannot be made to send these answers.)"""

    def __init__(self, body: bytes, status=200, content_type="application/json"):
        canned = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                canned.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _answer(tokens, logprobs, reason="stop", n=1):
    return json.dumps({"samples": [{"tokens": tokens, "logprobs": logprobs, "finish_reason": reason}] * n,
                       "policy_version": 3}).encode()


def test_client_retries_a_non_json_answer_then_names_the_service():
    canned = _Canned(b"<html>502 Bad Gateway</html>", content_type="text/html")
    try:
        client = RemoteSubPolicy(canned.url, max_new_tokens=6, max_prompt_tokens=16, deadline_s=1.0,
                                 initial_backoff_s=0.05)
        with pytest.raises(ServiceUnavailableError, match=rf"{canned.url}/generate .*not JSON.*text/html"):
            client.generate([[1, 2]], jax.random.key(0), [])
        assert canned.requests >= 2 and client.failures == 1
    finally:
        canned.close()


@pytest.mark.parametrize("answer, problem", [
    (_answer([3, 600], [-0.1, -0.2]), r"token id 600 outside the vocabulary \[0, 600\)"),
    (_answer([3, -4], [-0.1, -0.2]), "token id -4 outside the vocabulary"),
    (_answer([3, 4], [-0.1]), "2 tokens but 1 log-probs"),
    (_answer([3, 4], [-0.1, float("nan")]), "log-prob nan"),
    (_answer([3, 4], [-0.1, 0.5]), "log-prob 0.5"),
    (_answer([3] * 7, [-0.1] * 7), "7 tokens"),
    (_answer([3], [-0.1], reason="banana"), "finish_reason 'banana'"),
    (json.dumps({"samples": [], "policy_version": 3}).encode(), "0 samples for 1 prompts"),
    (json.dumps({"samples": [{"tokens": [3], "logprobs": [-1.0], "finish_reason": "stop"}]}).encode(),
     "policy_version=None"),
])
def test_client_refuses_answers_that_cannot_be_right(answer, problem):
    canned = _Canned(answer)
    try:
        client = RemoteSubPolicy(canned.url, max_new_tokens=6, max_prompt_tokens=16, deadline_s=5.0,
                                 vocab_size=600)
        with pytest.raises(InvalidServiceResponseError, match=rf"{canned.url}/generate answered with .*{problem}"):
            client.generate([[1, 2]], jax.random.key(0), [])
        assert canned.requests == 1 and client.invalid_responses == 1  # not retried
    finally:
        canned.close()


def _delegating_controller(sub_policy, max_sub_context=4096):
    tok = tokenizer()
    main = ScriptedPolicy(tok, lambda p: "<answer>x</answer>" if "<information>" in p.split("assistant\n")[-1]
                          else "<delegate>who?</delegate>")
    return Controller(config=ControllerConfig(max_main_context=4096, max_sub_context=max_sub_context, max_sub_turns=2),
                      codec=TextCodec(tok, max_observation_tokens=64), main_policy=main,
                      main_protocol=ProtocolConfig().main(), tools=ToolSet(tools()), sub_policy=sub_policy,
                      sub_protocol=ProtocolConfig().sub())


def test_an_invalid_answer_fails_the_delegations_and_records_nothing_of_it():
    canned = _Canned(_answer([3, 10**6], [-0.1, -0.2], n=2))  # one sample per delegation
    try:
        client = RemoteSubPolicy(canned.url, max_new_tokens=16, max_prompt_tokens=4096, deadline_s=5.0)
        client.expect_tokenizer(tokenizer())
        batch = _delegating_controller(client).run(["Who founded A?"], 2, jax.random.key(0))
    finally:
        canned.close()
    assert len(batch.sub) == 2 and batch.stats["sub_generation_failures"] == 2
    for t in batch.sub:
        assert t.finish_reason == "generation_failed" and "outside the vocabulary" in t.error
        assert sum(t.loss_mask) == 0 and 10**6 not in t.tokens


def test_tokenizer_mismatch_is_caught_when_the_service_comes_up_after_the_client(sampler_and_params):
    sampler, params = sampler_and_params
    port = free_port()
    client = RemoteSubPolicy(f"http://127.0.0.1:{port}", max_new_tokens=6, max_prompt_tokens=16, deadline_s=0.5,
                             request_timeout_s=0.2)
    client.expect_tokenizer(tokenizer())
    with pytest.raises(ServiceUnavailableError):  # not up yet: the main job starts anyway
        client.generate([[3, 4]], jax.random.key(0), [])
    other = tokenizer(seed=1)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer())
    with GenerationService(sampler, params, 0, port=port, tokenizer=other):
        with pytest.raises(TokenizerMismatchError, match="tokenizes differently"):
            client.generate([[3, 4]], jax.random.key(0), [])
    with GenerationService(sampler, params, 0, port=port, tokenizer=tokenizer()):
        assert len(client.generate([[3, 4]], jax.random.key(0), [])) == 1


def test_records_carry_the_version_that_generated_them_after_a_rollback():
    """The main job labelled sub records with the highest version it had seen: after the sub job rolled back
    (restored an older checkpoint), its new generations still looked as fresh as the lost ones."""
    tok = tokenizer()
    cfg = _model_config(len(tok))
    graphdef, params = nnx.split(init_model(cfg, seed=5))
    sampler = Sampler(graphdef, cfg, SamplerConfig(batch_size=8, max_new_tokens=4, prompt_buckets=(256,),
                                                   eos_ids=(1,), pad_id=0, overflow="error"))
    with GenerationService(sampler, params, 5, tokenizer=tok) as service:
        client = RemoteSubPolicy(service.url, max_new_tokens=4, max_prompt_tokens=256, deadline_s=30)
        client.expect_tokenizer(tok)
        controller = _delegating_controller(client, max_sub_context=256)
        batch = controller.run(["Who founded A?"], 2, jax.random.key(0))
        assert client.version == 5 and [t.policy_version for t in batch.sub] == [5, 5]
        assert all(t.num_sampled > 0 for t in batch.sub)
        service.set_weights(params, 3)  # the sub job restarted from its version-3 checkpoint
        batch = controller.run(["Who founded A?"], 2, jax.random.key(1))
    assert [t.policy_version for t in batch.sub] == [3, 3] and client.version == 3
    assert all(t.num_sampled > 0 for t in batch.sub)


def test_an_episode_is_as_old_as_its_oldest_served_turn():
    from mgrpo_jax.rollout.controller import _Episode

    ep = _Episode("sub", 0, 0, 0, [1, 2], version=9, task="Who founded A?")
    for version in (6, 4, 7):
        ep.add_sampled(ServedSample(np.array([3], np.int32), np.array([-0.5], np.float32), "stop", 0, version))
    assert ep.traj.policy_version == 4
