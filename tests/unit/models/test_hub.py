"""The hub check before anything runs, against a loopback hub (tests/fake_hub.py) and a temporary cache: never the
real hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftflow.models import hub
from ftflow.models.architecture import UnknownModelError, count_config_parameters, fetched_configs_dir, model_config_for
from tests.fake_hub import FakeHub, FakeModel, put_in_cache

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False}
FILES = {"config.json": json.dumps(CONFIG).encode(), "tokenizer.json": 7_000_000,
         "tokenizer_config.json": 2_000, "model-00001-of-00002.safetensors": 4_000_000_000,
         "model-00002-of-00002.safetensors": 1_000_000_000, "model.safetensors.index.json": 30_000,
         "pytorch_model-00001-of-00002.bin": 4_000_000_000, "original/consolidated.00.pth": 5_000_000_000,
         "README.md": 9_000}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, no token (neither HF_TOKEN nor a saved login), no answers remembered."""
    from huggingface_hub import constants

    folder = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_MEMO", {})
    monkeypatch.setattr(hub, "_OFFLINE_BECAUSE", None)
    return folder


@pytest.fixture
def online(cache, monkeypatch):
    """The hub client online, pointed at whatever ``HF_ENDPOINT`` the test sets."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def test_each_failure_gets_its_own_line_and_fix(online, monkeypatch):
    models = {"Qwen/Qwen2.5-0.5B": FakeModel(FILES), "meta-llama/Llama-3.2-1B": FakeModel(FILES, gated="manual")}
    with FakeHub(models) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        report = hub.check_models(["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5BB", "meta-llama/Llama-3.2-1B"])
    ok, typo, gated = report.checks.values()
    assert report.offline_reason is None and ok.usable and ok.message == ""
    assert typo.kind == "not-found" and typo.refused
    assert typo.message == (f"Qwen/Qwen2.5-0.5BB does not exist on the hub ({server.url}/Qwen/Qwen2.5-0.5BB) (or it "
                            "is private: put a token that can see it in HF_TOKEN): fix its models[].path in the config "
                            "(did you mean Qwen/Qwen2.5-0.5B?)")
    assert gated.kind == "gated-no-token"
    assert gated.message.startswith(f"meta-llama/Llama-3.2-1B is gated and no Hugging Face token is set: accept its "
                                    f"license at {server.url}/meta-llama/Llama-3.2-1B")
    assert "HF_TOKEN" in gated.message
    assert report.problems == {typo.model_id: typo.message, gated.model_id: gated.message}


def test_a_token_whose_account_has_not_accepted_the_license_is_told_where_to_accept_it(online, monkeypatch):
    models = {"meta-llama/Llama-3.2-1B": FakeModel(FILES, gated="manual", granted={"hf_granted"})}
    with FakeHub(models, tokens={"hf_granted", "hf_other"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_other")
        refused = hub.check_models(["meta-llama/Llama-3.2-1B"]).checks["meta-llama/Llama-3.2-1B"]
        monkeypatch.setenv("HF_TOKEN", "hf_granted")
        granted = hub.check_models(["meta-llama/Llama-3.2-1B"]).checks["meta-llama/Llama-3.2-1B"]
    assert refused.kind == "gated-not-accepted"
    assert refused.message == ("meta-llama/Llama-3.2-1B is gated and the account of HF_TOKEN has no access to it yet "
                               "(its license not accepted, or the request still awaits the authors' review): accept "
                               f"it at {server.url}/meta-llama/Llama-3.2-1B, then run again")
    assert granted.kind == "ok"
    # The token travels in the Authorization header only: never in a path, a message or the report.
    assert all("hf_other" not in r.path and "hf_granted" not in r.path for r in server.requests)
    assert "hf_other" not in repr(refused) and "hf_granted" not in repr(granted)


def test_an_invalid_token_is_said_once_for_every_model_without_asking_again(online, monkeypatch):
    with FakeHub({"Qwen/Qwen2.5-0.5B": FakeModel(FILES), "org/other": FakeModel(FILES)}, tokens={"hf_good"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", "hf_expired")
        report = hub.check_models(["Qwen/Qwen2.5-0.5B", "org/other"])
    assert [c.kind for c in report.checks.values()] == ["token-invalid", "token-invalid"]
    assert report.checks["org/other"].message == (
        f"org/other: the hub rejects HF_TOKEN as invalid: create a read token at {server.url}/settings/tokens and put "
        "it in HF_TOKEN (or unset it: public models need none)")
    assert len(server.requests) == 1


def test_the_files_a_load_downloads_and_what_the_cache_already_holds(online, monkeypatch):
    put_in_cache(online, "Qwen/Qwen2.5-0.5B", {"config.json": FILES["config.json"]})
    with FakeHub({"Qwen/Qwen2.5-0.5B": FakeModel(FILES)}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        check = hub.check_models(["Qwen/Qwen2.5-0.5B"]).checks["Qwen/Qwen2.5-0.5B"]
    # Safetensors and the small files at the root; not the .bin, the original/ checkpoint or the README.
    assert dict(check.files) == {name: (len(FILES[name]) if isinstance(FILES[name], bytes) else FILES[name]) for name in (
        "config.json", "tokenizer.json", "tokenizer_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json")}
    assert check.cached_files == ("config.json",)
    assert check.download_bytes() == 7_000_000 + 2_000 + 5_000_000_000 + 30_000


def test_an_unreachable_hub_makes_the_cache_stand_in_for_every_id_at_once(online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    put_in_cache(online, "org/cached", {"config.json": b"{}", "model.safetensors": b"w", "tokenizer.json": b"{}"})
    report = hub.check_models(["org/cached", "org/missing"])
    assert report.offline_reason.startswith("the hub at http://127.0.0.1:9 cannot be reached (")
    cached, missing = report.checks.values()
    assert cached.kind == "cached" and cached.usable
    assert missing.kind == "not-cached"
    assert missing.message.startswith(f"org/missing is not in the Hugging Face cache "
                                      f"({online / 'models--org--missing'}: no config.json) and the hub at "
                                      "http://127.0.0.1:9 cannot be reached (")
    assert "unset HF_HUB_OFFLINE" not in missing.message


def test_offline_a_model_must_be_complete_in_the_cache(cache):
    put_in_cache(cache, "org/whole", {"config.json": b"{}", "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}).encode(),
        "model-1.safetensors": b"w", "model-2.safetensors": b"w", "tokenizer_config.json": b"{}"})
    put_in_cache(cache, "org/half", {"config.json": b"{}", "model.safetensors.index.json": json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}).encode(),
        "model-1.safetensors": b"w", "tokenizer_config.json": b"{}"})
    report = hub.check_models(["org/whole", "org/half", "Qwen/Qwen2.5-0.5BB"])
    assert report.offline_reason == "HF_HUB_OFFLINE is set"
    assert [c.kind for c in report.checks.values()] == ["cached", "not-cached", "not-cached"]
    assert "1 of 2 weight shards missing (model-2.safetensors...)" in report.checks["org/half"].message
    assert report.checks["Qwen/Qwen2.5-0.5BB"].message == (
        f"Qwen/Qwen2.5-0.5BB is not in the Hugging Face cache ({cache / 'models--Qwen--Qwen2.5-0.5BB'}: no "
        "config.json) and HF_HUB_OFFLINE is set: download it once with network access (`hf download "
        "Qwen/Qwen2.5-0.5BB`), or point HF_HUB_CACHE (or HF_HOME) at a cache that holds it, or unset HF_HUB_OFFLINE "
        "if this machine can reach the hub (did you mean Qwen/Qwen2.5-0.5B?)")


def test_answers_are_kept_for_the_process_and_asked_once(online, monkeypatch):
    with FakeHub({"org/model": FakeModel(FILES)}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        first = hub.check_models(["org/model"])
        again = hub.check_models(["org/model"])
    assert again is first and len(server.requests) == 1


def test_hub_ids_are_told_from_local_paths(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert hub.is_hub_id("Qwen/Qwen2.5-0.5B")
    assert not hub.is_hub_id(str(tmp_path / "org" / "model"))
    assert not hub.is_hub_id("./org/model") and not hub.is_hub_id("a/b/c") and not hub.is_hub_id("bad id/x")


def test_an_unknown_models_config_is_read_from_the_hub_into_the_artifacts_and_planned(online, monkeypatch, tmp_path):
    with FakeHub({"someone/new-model": FakeModel(FILES)}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(UnknownModelError):
            model_config_for("someone/new-model")
        report = hub.check_models(["someone/new-model"])
        destination = fetched_configs_dir(tmp_path / "artifacts")
        assert hub.fetch_configs(report, destination) == {}
    assert json.loads((destination / "someone" / "new-model" / "config.json").read_text()) == CONFIG
    config = model_config_for("someone/new-model", config_dir=destination)
    assert (config.model_type, config.hidden_size) == ("llama", 64)
    assert count_config_parameters(config) > 0


def test_a_run_is_refused_only_when_the_hub_check_leaves_out_every_candidate():
    from types import SimpleNamespace

    from ftflow.errors import UserError

    models = [SimpleNamespace(name="a", path="org/a"), SimpleNamespace(name="b", path="org/b")]
    hub.require_a_usable_candidate(models, {"a": "org/a is gone"})  # b is left: the run goes on without a
    hub.require_a_usable_candidate([], {})  # a zoo config: its models are built, nothing to check
    with pytest.raises(hub.NoUsableModelError) as caught:
        hub.require_a_usable_candidate(models[:1], {"a": "org/a is gone"})
    assert str(caught.value) == "no candidate model can be used, nothing was run: a: org/a is gone"
    assert isinstance(caught.value, UserError)  # ftflow run: one "ftflow:" line, exit 2
    with pytest.raises(hub.NoUsableModelError) as caught:
        hub.require_a_usable_candidate(models, {"a": "org/a is gone", "b": "org/b is gated"})
    assert str(caught.value) == ("no candidate model can be used, nothing was run: \n  - a: org/a is gone\n"
                                 "  - b: org/b is gated")


def test_what_a_command_says_of_the_hub_check(cache):
    missing = hub.HubCheck("org/a", "not-cached", "org/a is not in the Hugging Face cache")
    offline = hub.HubReport({"org/a": missing}, offline_reason="HF_HUB_OFFLINE is set")
    assert hub.check_notes(offline, {"a": missing.message}) == [
        f"HF_HUB_OFFLINE is set: hub models are read from the Hugging Face cache ({cache})",
        "a is left out: org/a is not in the Hugging Face cache"]
    assert hub.check_notes(hub.HubReport({}, offline_reason="HF_HUB_OFFLINE is set"), {}) == []  # no hub id asked
    assert hub.check_notes(hub.HubReport({"org/a": hub.HubCheck("org/a", "ok")}), {}) == []


def test_validate_asks_the_hub_only_online_and_names_the_models_it_refuses(online, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from huggingface_hub import constants

    models = [SimpleNamespace(name=name, path=path) for name, path in (
        ("typo", "Qwen/Qwen2.5-0.5BB"), ("fine", "Qwen/Qwen2.5-0.5B"), ("gated", "meta-llama/Llama-3.2-1B"),
        ("local", str(tmp_path)))]
    with FakeHub({"Qwen/Qwen2.5-0.5B": FakeModel(FILES),
                  "meta-llama/Llama-3.2-1B": FakeModel(FILES, gated="manual")}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        refused = hub.refused_by_the_hub(models)
    assert list(refused) == ["typo", "gated"]
    assert refused["typo"].startswith(f"Qwen/Qwen2.5-0.5BB does not exist on the hub ({server.url}/Qwen/Qwen2.5-0.5BB)")
    assert refused["gated"].startswith("meta-llama/Llama-3.2-1B is gated and no Hugging Face token is set")
    # Offline nothing is asked, so nothing is refused: the models may only be missing from this machine's cache.
    monkeypatch.setattr(hub, "_MEMO", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.refused_by_the_hub(models) == {}
