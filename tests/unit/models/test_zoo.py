"""Tests of ftflow.models.zoo: tokenizers, configs, pretraining and checkpoints of the offline zoo.

Everything runs on micro sizes (hidden 16, one or two layers, vocabulary 300,
200 sentences, 5 steps) so the whole file takes seconds on two CPU cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ftflow.study import design
from ftflow.data import synthetic
from ftflow import tokens
from ftflow.models import zoo
from ftflow.config import ZooConfig, ZooSize

ARCHITECTURES = ("granite", "llama", "qwen2")
MODEL_CLASSES = {"granite": GraniteForCausalLM, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
CONFIG_CLASSES = {"granite": GraniteConfig, "llama": LlamaConfig, "qwen2": Qwen2Config}
MICRO_STUDENT = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}
MICRO_TEACHER = {**MICRO_STUDENT, "num_layers": 2}


def micro_config(architectures=ARCHITECTURES, **overrides) -> ZooConfig:
    """A zoo of micro models, one family per architecture."""
    raw = {
        "families": [
            {"name": f"{arch}-fam", "architecture": arch, "student": MICRO_STUDENT, "teacher": MICRO_TEACHER}
            for arch in architectures
        ],
        "vocab_size": 300,
        "corpus_sentences": 200,
        "pretrain_steps": 5,
        "batch_size": 8,
        "max_length": 32,
        **overrides,
    }
    return ZooConfig.model_validate(raw)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return synthetic.generate_sentences(200, 0, "general")


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """One micro zoo, built once for the module: (config, manifest, out_dir, log lines)."""
    cfg = micro_config()
    out_dir = tmp_path_factory.mktemp("zoo")
    lines: list[str] = []
    manifest = zoo.build_zoo(cfg, corpus, out_dir, progress=False, log=lines.append)
    return cfg, manifest, out_dir, lines


def state_dict_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def sample_batch(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    ids = [tokens.sentence_ids(tokenizer, s, 32)[0] for s in sentences]
    batch = tokens.pad_batch(ids, tokens.pad_token_id(tokenizer))
    return {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")}


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic_and_seeded(corpus):
    first = zoo.train_tokenizer(corpus, 300, seed=0)
    assert first.get_vocab() == zoo.train_tokenizer(corpus, 300, seed=0).get_vocab()
    assert first.backend_tokenizer.to_str() == zoo.train_tokenizer(corpus, 300, seed=0).backend_tokenizer.to_str()
    # The seed draws the training sample, so another seed learns other merges.
    assert first.get_vocab() != zoo.train_tokenizer(corpus, 300, seed=1).get_vocab()
    assert len(first) == 300


def test_tokenizer_specials_and_round_trip(corpus, tmp_path):
    tokenizer = zoo.train_tokenizer(corpus, 300, seed=0)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for tok in (tokenizer, loaded):
        assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")
        assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    texts = [
        "the acting is wonderful but the plot drags on far too long",
        " leading space and  double  spaces ",
        "Unseen CAPITALS, punctuation! and ünïcode 日本",
    ]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert tokenizer.unk_token_id not in ids  # byte level: everything encodes
        assert tokenizer.decode(ids) == text
        assert loaded.decode(ids) == text
    # The shared encoding prepends BOS and adds nothing else.
    ids, truncated = tokens.sentence_ids(loaded, "the plot", 32)
    assert ids[0] == 2 and 3 not in ids and not truncated
    assert loaded.decode(ids, skip_special_tokens=True) == "the plot"


def test_tokenizer_refuses_impossible_requests(corpus):
    with pytest.raises(ValueError, match="vocab_size must exceed 260"):
        zoo.train_tokenizer(corpus, 260, seed=0)
    with pytest.raises(ValueError, match="empty corpus"):
        zoo.train_tokenizer([], 300, seed=0)


# --- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_model_config_per_architecture(corpus, architecture):
    tokenizer = zoo.train_tokenizer(corpus, 300, seed=0)
    config = zoo.model_config(architecture, ZooSize(**MICRO_TEACHER), tokenizer, max_position_embeddings=32)
    assert type(config) is CONFIG_CLASSES[architecture]
    assert config.vocab_size == len(tokenizer) == 300
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 2, 3)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert config.max_position_embeddings == 32
    assert config.tie_word_embeddings is (architecture != "llama")


def test_impossible_sizes_are_reported_together_when_the_config_loads(corpus, tmp_path):
    odd_heads = {**MICRO_STUDENT, "num_heads": 3}  # 64 is not divisible by 3
    odd_groups = {**MICRO_STUDENT, "num_heads": 4, "num_kv_heads": 3}  # 4 heads in groups of 3
    narrow = {**MICRO_STUDENT, "hidden_size": 48, "intermediate_size": 96}  # not as real models are
    thin_kv = {**MICRO_STUDENT, "num_heads": 4}  # key/value projections 16 wide
    with pytest.raises(ValueError) as error:
        ZooConfig.model_validate(
            {
                "families": [
                    {"name": "a", "architecture": "llama", "student": odd_heads, "teacher": MICRO_TEACHER},
                    {"name": "b", "architecture": "qwen2", "student": narrow, "teacher": odd_groups},
                    {"name": "c", "architecture": "granite", "student": thin_kv, "teacher": MICRO_TEACHER},
                ],
                "vocab_size": 300,
            }
        )
    message = str(error.value)
    assert "zoo.families[a].student: hidden_size 64 is not divisible by num_heads 3" in message
    assert "zoo.families[b].teacher: num_heads 4 is not divisible by num_kv_heads 3" in message
    assert "zoo.families[b].student: hidden_size 48 is not a multiple of 64 (4-bit kernels need layer widths " \
           "as real models have them; use 64)" in message
    assert "zoo.families[b].student: intermediate_size 96 is not a multiple of 64" in message
    assert "zoo.families[c].student: the key/value projections are 16 wide (head size x num_kv_heads), not a " \
           "multiple of 32" in message
    assert "zoo.families[b].student: the key/value projections are 24 wide" in message
    assert message.count("zoo.families[") == 6
    tokenizer = zoo.train_tokenizer(corpus, 300, seed=0)
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        zoo.model_config("llama", ZooSize(**odd_heads), tokenizer, 32)


# --- pretraining ------------------------------------------------------------------------------


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    factors = [zoo._lr_factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1)  # warmup: 10 steps
    assert factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.55)  # halfway through the cosine
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert zoo._lr_factor(0, 1) == 1.0


@pytest.mark.slow
def test_pretraining_lowers_the_loss(corpus):
    tokenizer = zoo.train_tokenizer(corpus, 300, seed=0)
    config = zoo.model_config("llama", ZooSize(**MICRO_STUDENT), tokenizer, 32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    losses = zoo.pretrain(
        model, tokenizer, corpus, steps=30, batch_size=16, learning_rate=1e-2, max_length=32, seed=0
    )
    assert len(losses) == 30
    assert losses[0] == pytest.approx(math.log(300), abs=0.3)  # untrained: about uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert not model.training


# --- build_zoo --------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_zoo_writes_the_documented_manifest_and_layout(built):
    cfg, manifest, out_dir, lines = built
    assert manifest["corpus_sentences"] == 200
    assert [f["name"] for f in manifest["families"]] == ["granite-fam", "llama-fam", "qwen2-fam"]
    assert [f["architecture"] for f in manifest["families"]] == list(ARCHITECTURES)
    for family in manifest["families"]:
        student, teacher = family["members"]
        assert (student["role"], teacher["role"]) == ("student", "teacher")
        assert student["name"] == f"{family['name']}-student" and teacher["name"] == f"{family['name']}-teacher"
        assert teacher["parameters"] > student["parameters"]
        # The teacher's pretraining grows with its size: 5 steps x sqrt(its parameters / its student's).
        assert student["pretrain_steps"] == 5
        assert teacher["pretrain_steps"] == round(5 * math.sqrt(teacher["parameters"] / student["parameters"])) > 5
        for member in family["members"]:
            assert set(member) == {"name", "role", "path", "parameters", "pretrain_steps", "final_pretrain_loss"}
            assert Path(member["path"]) == out_dir / member["name"]
            assert isinstance(member["final_pretrain_loss"], float)
            assert 0 < member["final_pretrain_loss"] < 10
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        m["name"] for f in manifest["families"] for m in f["members"]
    )  # no staging directories left behind
    assert len(lines) == 6 and all(line.startswith("zoo: ") for line in lines)
    assert all(family["teacher_check"] is None for family in manifest["families"])  # built without a check


def test_checkpoints_load_as_hub_models_would(built, corpus):
    _, manifest, _, _ = built
    for family in manifest["families"]:
        for member in family["members"]:
            path = Path(member["path"])
            assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
                p.name for p in path.iterdir()
            }
            model = AutoModelForCausalLM.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            assert type(model) is MODEL_CLASSES[family["architecture"]]
            assert sum(p.numel() for p in model.parameters()) == member["parameters"]
            assert model.config.vocab_size == len(tokenizer) == 300
            assert tokenizer.model_max_length == 2048
            logits = model(**sample_batch(tokenizer, corpus[:3])).logits
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saved_checkpoint_reloads_with_identical_logits(corpus, tmp_path, architecture):
    tokenizer = zoo.train_tokenizer(corpus, 300, seed=0)
    config = zoo.model_config(architecture, ZooSize(**MICRO_STUDENT), tokenizer, 32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # A few steps so that tied embeddings have moved away from their initial values.
    zoo.pretrain(model, tokenizer, corpus, steps=3, batch_size=8, learning_rate=1e-2, max_length=32, seed=0)
    zoo.save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    zoo.save_checkpoint(model, tokenizer, tmp_path / "ckpt")  # replacing an existing checkpoint works
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    batch = sample_batch(tokenizer, corpus[:4])
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_student_and_teacher_share_their_family_tokenizer(built):
    _, manifest, _, _ = built
    tokenizer_files = {}
    for family in manifest["families"]:
        student, teacher = (Path(m["path"]) for m in family["members"])
        assert (student / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
        tokenizer_files[family["name"]] = (student / "tokenizer.json").read_bytes()
    # Each family trains its own tokenizer (seeded by its name), as real families differ.
    assert len(set(tokenizer_files.values())) == 3


def test_qwen2_family_has_no_bos_and_starts_sentences_with_eos(built):
    _, manifest, _, _ = built
    for family in manifest["families"]:
        tokenizer = AutoTokenizer.from_pretrained(family["members"][0]["path"])
        if family["architecture"] == "qwen2":
            assert tokenizer.bos_token_id is None
            assert tokens.start_token_id(tokenizer) == tokenizer.eos_token_id == 3
        else:
            assert tokens.start_token_id(tokenizer) == tokenizer.bos_token_id == 2


@pytest.mark.slow
def test_build_is_deterministic_and_leaves_the_global_rng_alone(built, corpus, tmp_path):
    cfg, manifest, out_dir, _ = built
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = zoo.build_zoo(cfg, corpus, tmp_path, progress=False, log=lambda _: None)
    assert torch.equal(torch.rand(3), expected_draw)

    for first_family, second_family in zip(manifest["families"], again["families"]):
        for first, second in zip(first_family["members"], second_family["members"]):
            assert {**first, "path": None} == {**second, "path": None}
            a, b = Path(first["path"]), Path(second["path"])
            assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
            weights_a, weights_b = state_dict_of(a), state_dict_of(b)
            assert weights_a.keys() == weights_b.keys()
            assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.slow
def test_seed_and_family_order_set_the_weights(built, corpus, tmp_path):
    cfg, manifest, _, _ = built
    original = Path(manifest["families"][1]["members"][0]["path"])  # llama-fam-student
    # Alone in its config, a family gets the same models: seeds come from names, not positions.
    alone = zoo.build_zoo(micro_config(("llama",)), corpus, tmp_path / "alone", progress=False, log=lambda _: None)
    alone_path = Path(alone["families"][0]["members"][0]["path"])
    assert all(torch.equal(v, state_dict_of(alone_path)[k]) for k, v in state_dict_of(original).items())
    reseeded = zoo.build_zoo(
        micro_config(("llama",), seed=1), corpus, tmp_path / "seed1", progress=False, log=lambda _: None
    )
    reseeded_path = Path(reseeded["families"][0]["members"][0]["path"])
    assert not torch.equal(
        state_dict_of(original)["model.layers.0.mlp.up_proj.weight"],
        state_dict_of(reseeded_path)["model.layers.0.mlp.up_proj.weight"],
    )


def test_teachers_can_pretrain_longer_than_their_students(corpus, tmp_path):
    lines = []
    zoo.build_zoo(micro_config(("llama",), teacher_pretrain_steps=7), corpus, tmp_path, progress=False,
                  log=lines.append)
    assert [line.split(" in ")[-1].split(",")[0] for line in lines] == ["5 steps", "7 steps"]


def test_the_teachers_steps_scale_with_its_size_unless_set():
    cfg = micro_config(pretrain_steps=300)
    assert zoo.scaled_teacher_steps(cfg, 140_000, 560_000) == 600  # 4x the parameters: 2x the steps
    assert zoo.scaled_teacher_steps(cfg, 100, 100) == 300
    assert zoo.scaled_teacher_steps(micro_config(pretrain_steps=300, teacher_pretrain_steps=7), 1, 10**6) == 7


def test_a_teacher_ahead_by_less_than_the_margin_is_not_a_teacher():
    # The zoo teacher: 116.94 against its student's 117.58 (0.5% lower) passed a plain "lower" check, then
    # lost to its student after fine-tuning. With the default 5% margin it does not pass.
    assert not zoo.beats_by_margin(116.94, 117.58, 0.05)
    assert zoo.beats_by_margin(116.94, 117.58, 0.0)
    assert zoo.beats_by_margin(0.95 * 117.58, 117.58, 0.05) and not zoo.beats_by_margin(0.951 * 117.58, 117.58, 0.05)
    assert ZooConfig.model_fields["teacher_margin"].default == 0.05


def checked_build(cfg: ZooConfig, corpus, out_dir: Path):
    """The zoo built with a check on 40 other sentences: (manifest, check, log lines, warnings)."""
    check = zoo.TeacherCheck(synthetic.generate_sentences(40, 7, "general"), "validation", 32)
    lines, warnings = [], []
    manifest = zoo.build_zoo(cfg, corpus, out_dir, check=check, progress=False, log=lines.append,
                             warn=warnings.append)
    return manifest, check, lines, warnings


def rescored(path: Path, check: zoo.TeacherCheck) -> float:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    return zoo._check_ppl(model, tokenizer, check)


@pytest.mark.slow
def test_a_teacher_that_loses_is_pretrained_more_rounds_until_it_beats_its_student(corpus, tmp_path):
    # A student pretrained 30 steps against a teacher given 6 a round: the first round cannot win.
    cfg = micro_config(("llama",), pretrain_steps=30, teacher_pretrain_steps=6, teacher_extra_rounds=8)
    manifest, check, lines, warnings = checked_build(cfg, corpus, tmp_path)
    (family,) = manifest["families"]
    record, (student, teacher) = family["teacher_check"], family["members"]
    rounds = record["teacher_ppl_by_round"]
    bar = 0.95 * record["student_ppl"]  # the default margin: 5% lower
    assert record["beats"] and not warnings and record["margin"] == 0.05
    assert rounds[0] > bar and rounds[-1] == record["teacher_ppl"] <= bar
    assert all(ppl > bar for ppl in rounds[:-1])  # it stopped at the first round that won by the margin
    assert 2 <= len(rounds) <= 9
    assert (record["student_steps"], record["teacher_steps"]) == (30, 6 * len(rounds))
    assert (student["pretrain_steps"], teacher["pretrain_steps"]) == (30, 6 * len(rounds))
    # The recorded figures are the saved checkpoints' own.
    assert rescored(Path(student["path"]), check) == pytest.approx(record["student_ppl"], rel=1e-9)
    assert rescored(Path(teacher["path"]), check) == pytest.approx(record["teacher_ppl"], rel=1e-9)
    assert sum("pretraining 6 more" in line for line in lines) == len(rounds) - 1
    assert lines[-1] == record["line"] and record["line"].endswith("the teacher beats its student")
    history = " -> ".join(f"{ppl:.2f}" for ppl in rounds)
    ahead = 100 * (1 - record["teacher_ppl"] / record["student_ppl"])
    assert record["line"] == (
        f"zoo check, family llama-fam: teacher validation PPL {record['teacher_ppl']:.4f} vs student "
        f"{record['student_ppl']:.4f} before fine-tuning, {ahead:+.1f}% lower (margin 5%; teacher pretrained "
        f"{6 * len(rounds)} steps in {len(rounds)} rounds, PPL {history}; student 30): the teacher beats its student")
    assert design.zoo_teacher_checks(manifest) == [record["line"]]


@pytest.mark.slow
def test_a_teacher_that_still_loses_is_saved_and_reported_with_what_to_change(corpus, tmp_path):
    cfg = micro_config(("qwen2",), pretrain_steps=30, teacher_pretrain_steps=1, teacher_extra_rounds=1)
    manifest, _, _, warnings = checked_build(cfg, corpus, tmp_path)
    (family,) = manifest["families"]
    record = family["teacher_check"]
    assert not record["beats"] and record["teacher_steps"] == 2 and len(record["teacher_ppl_by_round"]) == 2
    assert warnings == [record["line"]]
    assert "the teacher does NOT beat its student by the margin" in record["line"]
    for setting in ("zoo.corpus_file", "zoo.task_text", "zoo.teacher_pretrain_steps", "zoo.teacher_extra_rounds"):
        assert setting in record["line"]
    assert {p.name for p in tmp_path.iterdir()} == {"qwen2-fam-student", "qwen2-fam-teacher"}  # both saved


def test_the_teacher_check_needs_sentences(corpus, tmp_path):
    with pytest.raises(ValueError, match="teacher check needs sentences"):
        zoo.build_zoo(micro_config(), corpus, tmp_path, check=zoo.TeacherCheck(()), progress=False,
                      log=lambda _: None)


def test_build_zoo_refuses_an_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        zoo.build_zoo(micro_config(), [], tmp_path, progress=False, log=lambda _: None)


# --- corpus -----------------------------------------------------------------------------------


def test_load_corpus_generates_general_text_when_no_file_is_given():
    cfg = micro_config(corpus_sentences=150, seed=4)
    assert zoo.load_corpus(cfg) == synthetic.generate_sentences(150, 4, "general")


def test_load_corpus_adds_the_tasks_training_sentences_unless_task_text_is_off():
    task = ["a task sentence", "another one"]
    general = synthetic.generate_sentences(150, 4, "general")
    assert zoo.load_corpus(micro_config(corpus_sentences=150, seed=4), task) == general + task
    assert zoo.load_corpus(micro_config(corpus_sentences=150, seed=4, task_text=False), task) == general


def test_load_corpus_reads_the_first_non_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [f"  sentence number {i}  " for i in range(300)]
    lines.insert(1, "")
    lines.insert(5, "   \t ")
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # with a byte-order mark
    sentences = zoo.load_corpus(micro_config(corpus_file=path, corpus_sentences=100))
    assert sentences == [f"sentence number {i}" for i in range(100)]
    assert zoo.load_corpus(micro_config(corpus_file=path, corpus_sentences=1000)) == [
        f"sentence number {i}" for i in range(300)
    ]


def test_load_corpus_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        zoo.load_corpus(micro_config(corpus_file=missing))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        zoo.load_corpus(micro_config(corpus_file=tmp_path))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt has no sentences"):
        zoo.load_corpus(micro_config(corpus_file=blank))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the café was lovely\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text"):
        zoo.load_corpus(micro_config(corpus_file=latin1))
