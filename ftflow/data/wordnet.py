"""Find WordNet offline and open it with nltk, never downloading anything, never copying it.

Two sources are accepted, in this order:

1. an nltk data directory holding ``corpora/wordnet`` (or ``corpora/wordnet.zip``):
   the one given in config, then nltk's own search path (which includes the
   folders in ``NLTK_DATA`` and ``~/nltk_data``);
2. Debian's ``wordnet-base`` package, which installs WordNet 3.0 under
   ``/usr/share/wordnet``. That folder lacks the ``lexnames`` file nltk needs,
   and nltk (>= 3.9) refuses to read files outside its registered data paths:
   the folder is registered as one and read where it is, ``lexnames`` given to
   the reader from the WordNet 3.0 list of lexicographer files written out here.

Either is referenced, not copied: :func:`database_sha256` identifies the database
by its content (in the augmentation's cache key and manifest).
If neither exists, :class:`WordNetMissing` says exactly how to install it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

from ftflow.artifacts import sha256_file
from ftflow.errors import UserError

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


class WordNetMissing(UserError, RuntimeError):
    """No WordNet found; the message names every place looked at and the install command."""


def lexnames_text() -> str:
    """The ``lexnames`` file of WordNet 3.0, as nltk reads it (``NN\\tname\\tcategory``)."""
    return "".join(
        f"{number:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for number, name in enumerate(LEXNAMES_30)
    )


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


def _system_pointer(system_dir: Path):
    """nltk's pointer to a plain WordNet 3.0 database folder, read where it is (registered as an nltk data path)."""
    from nltk.data import FileSystemPathPointer

    missing = [name for name in REQUIRED_FILES if not (system_dir / name).is_file()]
    if missing:
        raise WordNetMissing(
            f"{system_dir} is not a complete WordNet database (missing {missing}); reinstall it: {INSTALL_COMMAND}"
        )
    _register_nltk_path(system_dir)
    return FileSystemPathPointer(str(system_dir))


def locate_wordnet(
    nltk_data_dir: Optional[Path] = None,
    system_dir: Path = DEBIAN_WORDNET_DIR,
    search_nltk_path: bool = True,
):
    """nltk's path pointer to a usable WordNet database: a ``corpora/wordnet`` folder, or ``system_dir`` itself.

    Args:
        nltk_data_dir: an nltk data folder to look in first (config ``augment.nltk_data_dir``).
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
        return _system_pointer(Path(system_dir))
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

        # Debian's database has no lexnames file: the WordNet 3.0 list is given instead.
        def open(self, file):
            if file == "lexnames" and not Path(str(self.root), "lexnames").is_file():
                return io.StringIO(lexnames_text())
            return super().open(file)

    with warnings.catch_warnings():
        # "The multilingual functions are not available": expected, no OMW data is used.
        warnings.simplefilter("ignore", UserWarning)
        reader = _READERS[key] = _EnglishWordNet(pointer, None)
    return reader


def load_wordnet(
    nltk_data_dir: Optional[Path] = None,
    system_dir: Path = DEBIAN_WORDNET_DIR,
    search_nltk_path: bool = True,
):
    """An nltk ``WordNetCorpusReader`` found by :func:`locate_wordnet` (opened once per folder)."""
    pointer = locate_wordnet(nltk_data_dir, system_dir, search_nltk_path)
    return _open(pointer)


def database_sha256(pointer) -> str:
    """The content hash of the WordNet database at ``pointer`` (from :func:`locate_wordnet`): what it is, not where.

    A folder counts by the names and contents of the files the reader opens (``lexnames`` and the optional
    ones when present); a zip archive by its bytes.
    """
    path = Path(str(pointer.path if hasattr(pointer, "path") else pointer))
    if path.is_file():
        return _sha256_of(str(path), path.stat().st_size, path.stat().st_mtime_ns)
    digest = hashlib.sha256()
    for name in REQUIRED_FILES + ("lexnames",) + OPTIONAL_FILES:
        file = path / name
        if file.is_file():
            stat = file.stat()
            digest.update(f"{name}\0{_sha256_of(str(file), stat.st_size, stat.st_mtime_ns)}\0".encode())
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    # 28 MB for Debian's database: hashed once per process while the files do not change.
    return sha256_file(Path(path))


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
