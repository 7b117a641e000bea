from pathlib import Path

import nltk
import pytest

from ftflow.data.wordnet import (DEBIAN_WORDNET_DIR, INSTALL_COMMAND, REQUIRED_FILES, WordNetMissing, database_sha256,
                                 lexnames_text, load_wordnet, locate_wordnet, synonyms)
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
def wordnet():
    # Opened once (a few seconds) and shared.
    return load_wordnet(search_nltk_path=False)


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
        locate_wordnet(nltk_data_dir=tmp_path / "empty", system_dir=tmp_path / "no-wordnet", search_nltk_path=False)
    message = str(error.value)
    assert "apt-get install -y --no-install-recommends wordnet-base" in message
    assert str(tmp_path / "empty") in message and str(tmp_path / "no-wordnet") in message


def test_incomplete_system_folder_is_refused(tmp_path):
    system = tmp_path / "wordnet"
    system.mkdir()
    (system / "index.noun").write_text("x\n")
    with pytest.raises(WordNetMissing, match=r"missing \['index.verb'.*wordnet-base"):
        locate_wordnet(system_dir=system, search_nltk_path=False)


def test_a_system_database_is_read_where_it_is_and_known_by_its_content(tmp_path):
    system = fake_database(tmp_path / "system")
    found = locate_wordnet(system_dir=system, search_nltk_path=False)
    assert Path(str(found)) == system
    assert str(system) in nltk.data.path  # registered: nltk only reads inside its data paths
    assert sorted(p.name for p in tmp_path.iterdir()) == ["system"]  # nothing copied or built anywhere
    before = database_sha256(found)
    copy = fake_database(tmp_path / "elsewhere")
    assert database_sha256(locate_wordnet(system_dir=copy, search_nltk_path=False)) == before  # content, not place
    (system / "index.noun").write_text("changed\n")
    assert database_sha256(found) != before


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
    found = locate_wordnet(system_dir=tmp_path / "none")
    assert Path(str(found)) == tmp_path / "env" / "corpora" / "wordnet"


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
    # Debian's database, read where it is installed (no lexnames file there: given from the 3.0 list).
    assert Path(wordnet.root.path) == DEBIAN_WORDNET_DIR
    assert not (DEBIAN_WORDNET_DIR / "lexnames").exists()
