"""Find WordNet offline and open it with nltk, never downloading anything.

Two sources are accepted, in this order:

1. an nltk data directory holding ``corpora/wordnet`` (or ``corpora/wordnet.zip``):
   the one given in config, then nltk's own search path (which includes the
   folders in ``NLTK_DATA`` and ``~/nltk_data``);
2. Debian's ``wordnet-base`` package, which installs WordNet 3.0 under
   ``/usr/share/wordnet``. That folder lacks the ``lexnames`` file nltk needs,
   and nltk (>= 3.9) refuses to read files outside its registered data paths
   (symlinks resolving elsewhere included), so the files are copied once into
   ``<cache_dir>/nltk_data/corpora/wordnet`` with ``lexnames`` written from the
   WordNet 3.0 list of lexicographer files, and that folder is registered.

If neither exists, :class:`WordNetMissing` says exactly how to install it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")
INSTALL_COMMAND = "apt-get install -y --no-install-recommends wordnet-base"

# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)): number, name and
# syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb). Written out here
# because Debian ships the list only inside a man page, which slim images drop.
LEXNAMES_30 = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
# What nltk's reader opens when it starts (the rest of its file list is optional).
REQUIRED_FILES = tuple(
    f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
) + tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))
OPTIONAL_FILES = ("cntlist.rev", "index.sense")


class WordNetMissing(RuntimeError):
    """No WordNet found; the message names every place looked at and the install command."""


def lexnames_text() -> str:
    """The ``lexnames`` file of WordNet 3.0, as nltk reads it (``NN\\tname\\tcategory``)."""
    return "".join(
        f"{number:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for number, name in enumerate(LEXNAMES_30)
    )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ftflow`` (``~/.cache/ftflow`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ftflow"


def _register_nltk_path(directory: Path) -> None:
    # nltk only opens files under the folders in nltk.data.path (its path sandbox).
    import nltk

    text = str(directory)
    if text not in nltk.data.path:
        nltk.data.path.append(text)


def _find_in_nltk_dirs(dirs: Sequence[Path]):
    """nltk's pointer to ``corpora/wordnet`` in the first of ``dirs`` that has it, else None."""
    import nltk

    for directory in dirs:
        try:
            pointer = nltk.data.find("corpora/wordnet", paths=[str(directory)])
        except LookupError:
            continue
        _register_nltk_path(Path(directory))
        return pointer
    return None


def build_from_system(system_dir: Path, cache_dir: Path) -> Path:
    """Make ``<cache_dir>/nltk_data`` hold an nltk-readable copy of a WordNet 3.0 database folder.

    Args:
        system_dir: a folder with WordNet's ``index.*``, ``data.*`` and ``*.exc`` files
            (Debian: ``/usr/share/wordnet``).
        cache_dir: where the nltk data folder is built (once; reused afterwards).

    Returns:
        The nltk data folder (the parent of ``corpora/wordnet``).
    """
    data_dir = Path(cache_dir) / "nltk_data"
    target = data_dir / "corpora" / "wordnet"
    if all((target / name).is_file() for name in REQUIRED_FILES + ("lexnames",)):
        return data_dir
    missing = [name for name in REQUIRED_FILES if not (system_dir / name).is_file()]
    if missing:
        raise WordNetMissing(
            f"{system_dir} is not a complete WordNet database (missing {missing}); reinstall it: {INSTALL_COMMAND}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final place and renamed in, so a crash never leaves half a database.
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    try:
        for name in REQUIRED_FILES + OPTIONAL_FILES:
            if (system_dir / name).is_file():
                # A copy, not a link: nltk refuses files that resolve outside its data paths.
                shutil.copyfile(system_dir / name, tmp / name)
        (tmp / "lexnames").write_text(lexnames_text(), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private; the database is not secret
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "lexnames").is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir


def locate_wordnet(
    nltk_data_dir: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    system_dir: Path = DEBIAN_WORDNET_DIR,
    search_nltk_path: bool = True,
):
    """nltk's path pointer to a usable ``corpora/wordnet`` folder, building one if needed.

    Args:
        nltk_data_dir: an nltk data folder to look in first (config ``augment.nltk_data_dir``).
        cache_dir: where a copy of ``system_dir`` is built (default :func:`default_cache_dir`).
        system_dir: a plain WordNet 3.0 database folder, used when no nltk data folder has WordNet.
        search_nltk_path: also look in nltk's own search path (``NLTK_DATA``, ``~/nltk_data``, ...).

    Raises:
        WordNetMissing: nothing found; the message lists where it looked and how to install WordNet.
    """
    import nltk

    looked = []
    if nltk_data_dir is not None:
        looked.append(str(nltk_data_dir))
        found = _find_in_nltk_dirs([Path(nltk_data_dir)])
        if found is not None:
            return found
    if search_nltk_path:
        paths = [Path(p) for p in nltk.data.path if isinstance(p, str)]
        looked.extend(str(p) for p in paths)
        found = _find_in_nltk_dirs(paths)
        if found is not None:
            return found
    looked.append(str(system_dir))
    if (system_dir / "index.noun").is_file():
        data_dir = build_from_system(system_dir, cache_dir or default_cache_dir())
        found = _find_in_nltk_dirs([data_dir])
        if found is not None:
            return found
    raise WordNetMissing(
        "WordNet is needed by the synonym and random_insert augmentations but was not found "
        f"(looked for corpora/wordnet in: {', '.join(looked)}). Install it with\n"
        f"    {INSTALL_COMMAND}\n"
        "(as root; Debian/Ubuntu), or point augment.nltk_data_dir / NLTK_DATA at an nltk data folder "
        "holding corpora/wordnet, or drop synonym and random_insert from augment.methods. "
        "ftflow never downloads it at run time."
    )


_READERS: dict[str, object] = {}


def _open(pointer):
    key = str(pointer)
    if key in _READERS:
        return _READERS[key]
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _EnglishWordNet(WordNetCorpusReader):
        # The reader maps synsets between WordNet versions for multilingual (OMW)
        # lookups through index.sense, which Debian ships in a separate package;
        # ftflow only reads English synonyms, so the mapping is skipped.
        def map_wn(self, version="wordnet"):
            return None

    with warnings.catch_warnings():
        # "The multilingual functions are not available": expected, no OMW data is used.
        warnings.simplefilter("ignore", UserWarning)
        reader = _READERS[key] = _EnglishWordNet(pointer, None)
    return reader


def load_wordnet(
    nltk_data_dir: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    system_dir: Path = DEBIAN_WORDNET_DIR,
    search_nltk_path: bool = True,
):
    """An nltk ``WordNetCorpusReader`` found by :func:`locate_wordnet` (opened once per folder)."""
    pointer = locate_wordnet(nltk_data_dir, cache_dir, system_dir, search_nltk_path)
    return _open(pointer)


def synonyms(wordnet, word: str) -> list[str]:
    """Distinct WordNet synonyms of ``word`` over all parts of speech, in WordNet's order.

    As in EDA (Wei & Zou, 2019), no part-of-speech tagging: every synset of the
    word counts. Multi-word lemmas come back with spaces; the word itself and
    non-alphabetic lemmas are left out.
    """
    found: list[str] = []
    lowered = word.lower()
    for synset in wordnet.synsets(lowered):
        for lemma in synset.lemmas():
            name = lemma.name().replace("_", " ").replace("-", " ").lower()
            if name != lowered and name not in found and all(part.isalpha() for part in name.split()):
                found.append(name)
    return found
