from pathlib import Path

import nltk
import pytest

from ftflow.wordnet import (
    DEBIAN_WORDNET_DIR,
    INSTALL_COMMAND,
    REQUIRED_FILES,
    WordNetMissing,
    build_from_system,
    lexnames_text,
    load_wordnet,
    locate_wordnet,
    synonyms,
)
from tests.needs import needs

HAVE_DEBIAN_WORDNET = (DEBIAN_WORDNET_DIR / "index.noun").is_file()
requires_wordnet = needs(HAVE_DEBIAN_WORDNET, f"WordNet under {DEBIAN_WORDNET_DIR}", INSTALL_COMMAND)


def fake_database(directory: Path) -> Path:
    """A folder with every file nltk needs (placeholder contents, no lexnames)."""
    directory.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (directory / name).write_text(f"placeholder {name}\n")
    return directory


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    # One cache folder for the session: the reader is opened once (a few seconds) and shared.
    return load_wordnet(cache_dir=tmp_path_factory.getbasetemp() / "wordnet-cache", search_nltk_path=False)


def test_lexnames_is_the_wordnet_30_list():
    lines = lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3"
    assert lines[2] == "02\tadv.all\t4"
    assert lines[3] == "03\tnoun.Tops\t1"
    assert lines[28] == "28\tnoun.time\t1"
    assert lines[29] == "29\tverb.body\t2"
    assert lines[43] == "43\tverb.weather\t2"
    assert lines[44] == "44\tadj.ppl\t3"
    # nltk's reader asserts that the numbers count up from 0
    assert [int(line.split("\t")[0]) for line in lines] == list(range(45))


def test_missing_wordnet_names_the_install_command(tmp_path):
    with pytest.raises(WordNetMissing) as error:
        locate_wordnet(nltk_data_dir=tmp_path / "empty", cache_dir=tmp_path / "cache",
                       system_dir=tmp_path / "no-wordnet", search_nltk_path=False)
    message = str(error.value)
    assert "apt-get install -y --no-install-recommends wordnet-base" in message
    assert str(tmp_path / "empty") in message and str(tmp_path / "no-wordnet") in message
    assert not (tmp_path / "cache").exists()


def test_incomplete_system_folder_is_refused(tmp_path):
    system = tmp_path / "wordnet"
    system.mkdir()
    (system / "index.noun").write_text("x\n")
    with pytest.raises(WordNetMissing, match=r"missing \['index.verb'.*wordnet-base"):
        locate_wordnet(cache_dir=tmp_path / "cache", system_dir=system, search_nltk_path=False)


def test_build_copies_files_and_writes_lexnames_once(tmp_path):
    system = fake_database(tmp_path / "system")
    (system / "cntlist.rev").write_text("counts\n")
    data_dir = build_from_system(system, tmp_path / "cache")
    target = data_dir / "corpora" / "wordnet"
    assert data_dir == tmp_path / "cache" / "nltk_data"
    for name in REQUIRED_FILES + ("cntlist.rev",):
        assert (target / name).read_text() == (system / name).read_text()
        assert not (target / name).is_symlink()  # nltk refuses links that resolve outside its data paths
    assert (target / "lexnames").read_text() == lexnames_text()
    assert sorted(p.name for p in (data_dir / "corpora").iterdir()) == ["wordnet"]  # no temporary folder left
    stamp = (target / "lexnames").stat().st_mtime_ns
    (system / "index.noun").write_text("changed\n")
    assert build_from_system(system, tmp_path / "cache") == data_dir
    assert (target / "lexnames").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_configured_nltk_data_dir_comes_first(tmp_path, monkeypatch):
    fake_database(tmp_path / "mine" / "corpora" / "wordnet")
    fake_database(tmp_path / "env" / "corpora" / "wordnet")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "env")])
    found = locate_wordnet(nltk_data_dir=tmp_path / "mine", system_dir=tmp_path / "none")
    assert Path(str(found)) == tmp_path / "mine" / "corpora" / "wordnet"
    assert str(tmp_path / "mine") in nltk.data.path  # registered: nltk only reads inside its data paths


def test_nltk_search_path_is_used_when_nothing_is_configured(tmp_path, monkeypatch):
    fake_database(tmp_path / "env" / "corpora" / "wordnet")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "elsewhere"), str(tmp_path / "env")])
    found = locate_wordnet(cache_dir=tmp_path / "cache", system_dir=tmp_path / "none")
    assert Path(str(found)) == tmp_path / "env" / "corpora" / "wordnet"
    assert not (tmp_path / "cache").exists()


@requires_wordnet
def test_debian_wordnet_opens_offline(wordnet, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download called")

    monkeypatch.setattr(nltk, "download", no_download)
    assert wordnet.get_version() == "3.0"
    film = wordnet.synsets("film")
    assert film[0].name() == "movie.n.01" and film[0].lexname() == "noun.communication"
    assert synonyms(wordnet, "film")[:3] == ["movie", "picture", "moving picture"]
    assert synonyms(wordnet, "fun") == ["merriment", "playfulness", "play", "sport"]
    assert synonyms(wordnet, "the") == []
    root = Path(str(locate_wordnet(cache_dir=Path(wordnet.root.path).parents[2], search_nltk_path=False)))
    assert root == Path(wordnet.root.path)
    assert not any(p.is_symlink() for p in root.iterdir())
