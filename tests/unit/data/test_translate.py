import random
import time

import pytest
import requests
from deep_translator import exceptions as dt
from pydantic import ValidationError

from ftflow.config import AugmentConfig, BackTranslationConfig
from ftflow.data.translate import (CachedTranslator, RateLimiter, RetryPolicy, TranslationCache, TranslationFailed,
                                   TranslationServiceDown, _install_timeout_hook, backoff_delay, build_back_translator,
                                   call_with_retries, is_network_error, make_deep_translator, service_id)
from tests.fake_libretranslate import FakeLibreTranslate, fake_translate


class FixedRng:
    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # a proxy must not see loopback calls
    with FakeLibreTranslate(max_requests=200, lifetime_s=30) as fake:
        yield fake


def libre(server, **overrides) -> BackTranslationConfig:
    settings = dict(service="libre", url=server.url, requests_per_second=1000, retries=2, backoff_base_s=0.01,
                    backoff_max_s=0.05, request_timeout_s=2.0, give_up_after_failures=3)
    settings.update(overrides)
    return BackTranslationConfig(**settings)


# -- retries, backoff, rate limit ---------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_jitter_shaves():
    policy = RetryPolicy(retries=6, base_delay_s=1.0, max_delay_s=10.0, jitter=0.5)
    assert [backoff_delay(policy, n, FixedRng(0.0)) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert [backoff_delay(policy, n, FixedRng(1.0)) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(RetryPolicy(jitter=0.0), 1, random.Random(3)) == 2.0


def test_network_errors_are_retried_until_success():
    sleeps, outcomes = Sleeps(), [requests.exceptions.ConnectionError("refused"), dt.ServerException(503), "ok"]

    def flaky():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    policy = RetryPolicy(retries=3, base_delay_s=0.5, max_delay_s=10, jitter=0.0)
    assert call_with_retries(flaky, policy, sleep=sleeps) == "ok"
    assert sleeps == [0.5, 1.0]


def test_refusals_are_not_retried_and_retries_end():
    sleeps, calls = Sleeps(), []

    def refused():
        calls.append(1)
        raise dt.ServerException(400)

    with pytest.raises(dt.ServerException):
        call_with_retries(refused, RetryPolicy(retries=3), sleep=sleeps)
    assert len(calls) == 1 and sleeps == []

    def down():
        calls.append(1)
        raise requests.exceptions.Timeout("slow")

    calls.clear()
    with pytest.raises(requests.exceptions.Timeout):
        call_with_retries(down, RetryPolicy(retries=2, base_delay_s=1, jitter=0), sleep=sleeps)
    assert len(calls) == 3 and sleeps == [1, 2]


@pytest.mark.parametrize("exc, transient", [
    (requests.exceptions.ConnectionError(), True),
    (requests.exceptions.ReadTimeout(), True),
    (dt.TooManyRequests(), True),
    (dt.RequestError(), True),
    (dt.ServerException(429), True),
    (dt.ServerException(500), True),
    (dt.ServerException(502), True),
    (dt.ServerException(503), True),
    (dt.ServerException(400), False),
    (dt.ServerException(413), False),
    (dt.AuthorizationException("k"), False),
    (dt.TranslationNotFound("x"), False),
    (dt.NotValidLength("x", 0, 5), False),
    (ValueError("bug"), False),
])
def test_only_network_errors_count_as_transient(exc, transient):
    assert is_network_error(exc) is transient


def test_rate_limiter_spaces_calls():
    now, sleeps = [0.0], Sleeps()

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    limiter.wait()  # t=0: at once
    limiter.wait()  # t=0: waits 0.25
    now[0] += 1.0  # t=1.25: idle for a second, no wait
    limiter.wait()
    limiter.wait()
    assert sleeps == [0.25, 0.25] and limiter.waited_s == 0.5
    with pytest.raises(ValueError):
        RateLimiter(0)


# -- cache --------------------------------------------------------------------


def test_cache_is_keyed_by_service_languages_and_text_and_persists(tmp_path):
    with TranslationCache.in_dir(tmp_path) as cache:
        cache.put("libre@a/", "en", "de", "good", "gut")
        assert cache.get("libre@a/", "en", "de", "good") == "gut"
        assert cache.get("libre@b/", "en", "de", "good") is None
        assert cache.get("libre@a/", "de", "en", "good") is None
        assert cache.get("libre@a/", "en", "fr", "good") is None
        assert cache.get("libre@a/", "en", "de", "Good") is None
    with TranslationCache.in_dir(tmp_path) as again:
        assert again.get("libre@a/", "en", "de", "good") == "gut" and len(again) == 1


def test_empty_answer_fails_and_is_not_cached(tmp_path):
    answers = ["", "  ", "gut"]
    with TranslationCache(tmp_path / "c.sqlite") as cache:
        leg = CachedTranslator("stub", "en", "de", lambda text: answers.pop(0), cache)
        for _ in range(2):
            with pytest.raises(TranslationFailed) as error:
                leg.translate("good")
            assert error.value.reason == "empty"
        assert leg.translate("good") == "gut" and leg.translate("good") == "gut"
        assert leg.stats.as_dict() == {"requested": 4, "cache_hits": 1, "service_calls": 3, "retries": 0,
                                       "failed": {"network": 0, "empty": 2, "rejected": 0}}


# -- deep-translator against the loopback LibreTranslate server ------------------


def test_round_trip_through_real_http_and_rerun_never_calls_again(server, tmp_path):
    sentences = ["the film was good", "the plot was fun", "great acting"]
    bt, cache = build_back_translator(libre(server), tmp_path)
    with cache:
        first = bt.back_translate_many(sentences)
    assert first == {"the film was good": "the film was fine", "the plot was fun": "the plot was funny",
                     "great acting": "excellent acting"}
    assert len(server.translate_calls) == 6
    assert {(c.source, c.target) for c in server.translate_calls} == {("en", "de"), ("de", "en")}
    assert server.translate_calls[0].q == "the film was good" and server.translate_calls[1].q == "der Film war gut"

    bt, cache = build_back_translator(libre(server), tmp_path)  # a rerun: new process, same cache folder
    with cache:
        assert bt.back_translate_many(sentences) == first
    assert len(server.translate_calls) == 6
    assert bt.stats()["forward"]["cache_hits"] == 3 and bt.stats()["forward"]["service_calls"] == 0


def test_server_errors_are_retried_with_backoff(server, tmp_path):
    sleeps = Sleeps()
    server.fail_next(2, status=503)
    bt, cache = build_back_translator(libre(server), tmp_path, sleep=sleeps)
    with cache:
        assert bt("the film was good") == "the film was fine"
    assert [c.status for c in server.translate_calls] == [503, 503, 200, 200]
    assert bt.stats()["forward"]["retries"] == 2
    retry_sleeps = [s for s in sleeps if s >= 0.005]  # the rate limiter's own waits are shorter
    assert len(retry_sleeps) == 2 and 0.005 <= retry_sleeps[0] <= 0.01 and 0.01 <= retry_sleeps[1] <= 0.02


def test_a_stalled_request_times_out_and_is_retried(server, tmp_path):
    server.stall_next(1, seconds=1.5)
    bt, cache = build_back_translator(libre(server, request_timeout_s=0.3), tmp_path)
    started = time.monotonic()
    with cache:
        assert bt("great acting") == "excellent acting"
    assert time.monotonic() - started < 1.4
    assert bt.stats()["forward"]["retries"] == 1


def test_timeout_is_added_only_to_translation_calls(server):
    _install_timeout_hook()
    server.stall_next(1, seconds=0.5)
    response = requests.post(server.url + "translate", params={"q": "good", "source": "en", "target": "de"})
    assert response.json() == {"translatedText": "gut"}  # a plain requests call waited: no timeout injected


def test_failed_sentence_is_counted_and_others_go_on(server, tmp_path):
    server.fail_word("poison", status=500)
    bt, cache = build_back_translator(libre(server), tmp_path, sleep=Sleeps())
    with cache:
        results = bt.back_translate_many(["the poison film", "the film was good"])
        assert len(cache) == 2  # only the good sentence's two legs
    failure = results["the poison film"]
    assert isinstance(failure, TranslationFailed) and failure.reason == "network"
    assert results["the film was good"] == "the film was fine"
    assert bt.stats()["forward"]["failed"] == {"network": 1, "empty": 0, "rejected": 0}
    assert sum(c.q == "the poison film" for c in server.translate_calls) == 3  # 1 + 2 retries


def test_empty_translation_from_the_service_is_a_failure(server, tmp_path):
    server.empty_next(1)
    bt, cache = build_back_translator(libre(server), tmp_path)
    with cache:
        outcome = bt.back_translate_many(["the film was good"])["the film was good"]
        assert isinstance(outcome, TranslationFailed) and outcome.reason == "empty" and len(cache) == 0
        assert bt("the film was good") == "the film was fine"  # not cached: asked again


def test_api_key_comes_from_the_named_environment_variable(server, tmp_path, monkeypatch):
    server.require_key("s3cret")
    monkeypatch.setenv("FTFLOW_TEST_LIBRE_KEY", "s3cret")
    bt, cache = build_back_translator(libre(server, api_key_env="FTFLOW_TEST_LIBRE_KEY"), tmp_path / "a")
    with cache:
        assert bt("good") == "fine"
    assert {c.api_key for c in server.translate_calls} == {"s3cret"}

    monkeypatch.setenv("FTFLOW_TEST_LIBRE_KEY", "wrong")
    bt, cache = build_back_translator(libre(server, api_key_env="FTFLOW_TEST_LIBRE_KEY"), tmp_path / "b")
    calls_before = len(server.translate_calls)
    with cache:
        outcome = bt.back_translate_many(["bad"])["bad"]
    assert isinstance(outcome, TranslationFailed) and outcome.reason == "rejected"
    assert len(server.translate_calls) == calls_before + 1  # a refusal is not retried

    monkeypatch.delenv("FTFLOW_TEST_LIBRE_KEY")
    with pytest.raises(ValueError, match="export FTFLOW_TEST_LIBRE_KEY="):
        build_back_translator(libre(server, api_key_env="FTFLOW_TEST_LIBRE_KEY"), tmp_path / "c")
    with pytest.raises(ValidationError):
        AugmentConfig(back_translation={"service": "libre", "api_key": "s3cret"})


def test_unreachable_service_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FakeLibreTranslate() as gone:
        url = gone.url
    settings = BackTranslationConfig(service="libre", url=url, retries=1, backoff_base_s=0.0,
                                     requests_per_second=1000, give_up_after_failures=3)
    bt, cache = build_back_translator(settings, tmp_path)
    with cache, pytest.raises(TranslationServiceDown, match="3 texts in a row"):
        bt.back_translate_many([f"sentence {i}" for i in range(10)])


# -- service factory -------------------------------------------------------------


def test_services_are_built_from_config_without_network(monkeypatch):
    monkeypatch.setenv("FTFLOW_TEST_DEEPL", "k")
    google = make_deep_translator(BackTranslationConfig(service="google"), "en", "de")
    assert (google.source, google.target) == ("en", "de")
    mymemory = make_deep_translator(BackTranslationConfig(service="mymemory"), "en", "de")
    assert (mymemory.source, mymemory.target) == ("en-GB", "de-DE")  # MyMemory spells languages its own way
    deepl = make_deep_translator(BackTranslationConfig(service="deepl", api_key_env="FTFLOW_TEST_DEEPL"), "de", "en")
    assert deepl.api_key == "k"
    assert service_id(BackTranslationConfig(service="libre", url="http://h:5000")) == "libre@http://h:5000/"
    assert service_id(BackTranslationConfig(service="google")) == "google"


@pytest.mark.parametrize("settings, message", [
    ({"service": "local"}, "local_forward_model_dir"),
    ({"service": "google", "url": "http://x"}, "url is only used with service libre"),
    ({"service": "deepl"}, "needs api_key_env"),
    ({"service": "google", "api_key_env": "K"}, "api_key_env is only used"),
    ({"service": "google", "local_forward_model_dir": "/m"}, "only used with service local"),
    ({"pivot_lang": "en"}, "must differ"),
    ({"api_key_env": "not a name"}, "pattern"),
])
def test_settings_that_would_be_ignored_are_errors(settings, message):
    with pytest.raises(ValidationError, match=message):
        BackTranslationConfig(**settings)


# -- offline back-translation with a local model ------------------------------------


def tiny_marian(directory, vocab: dict[str, int], favourite: str):
    """A randomly initialised 1-layer Marian model that always says ``favourite`` (a logit bias)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config)
    with torch.no_grad():
        model.final_logits_bias[0, vocab[favourite]] = 100.0
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def test_local_model_back_translation_is_cached(tmp_path):
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "the": 3, "film": 4, "was": 5, "good": 6, "gut": 7, "fine": 8}
    settings = BackTranslationConfig(
        service="local", local_forward_model_dir=tiny_marian(tmp_path / "en-de", vocab, "gut"),
        local_backward_model_dir=tiny_marian(tmp_path / "de-en", vocab, "fine"), local_max_new_tokens=3,
    )
    bt, cache = build_back_translator(settings, tmp_path / "cache")
    with cache:
        assert bt.back_translate_many(["the film was good", "good"]) == {"the film was good": "fine fine fine",
                                                                        "good": "fine fine fine"}
        assert cache.get(f"local:{tmp_path / 'en-de'}", "en", "de", "good") == "gut gut gut"
        assert bt.stats()["forward"]["service_calls"] == 1  # one batch
    bt, cache = build_back_translator(settings, tmp_path / "cache")
    with cache:
        assert bt("good") == "fine fine fine"
    assert bt.stats()["forward"]["service_calls"] == 0 and bt.stats()["backward"]["service_calls"] == 0


def test_fake_server_translation_is_deterministic():
    assert fake_translate("the film was good", "en", "de") == "der Film war gut"
    assert fake_translate("der Film war gut", "de", "en") == "the film was fine"
