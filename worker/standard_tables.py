"""highdicom's table of the standard's modules, read one module at a time.

highdicom checks an IOD's attributes against the module/attribute table of PS3.3, shipped as
``highdicom/_standard/module_attribute_map.json`` (22 MB). Every SOP instance it builds asks
whether its IOD has Content Date and Content Time (``highdicom.base.SOPClass``), and the
first answer loads the whole table: about 64 MB of Python objects kept for the life of the
process, a third of a worker's memory, for the few modules a Secondary Capture and a
Comprehensive 3D SR consist of.

:func:`install` gives highdicom a mapping with the same keys and values that parses a
module's entry only when it is looked up (and keeps the ones looked up). The file is
pretty-printed: a top-level key is a line that starts with two spaces and a quote (JSON
strings hold no raw newline, deeper entries are indented further). Where that layout is not
found, the mapping falls back to reading the whole file, as highdicom does: slower to start,
never wrong.

:func:`install_concepts` does the same for pydicom's dictionary of PS3.16 coded concepts
(``pydicom/sr/_concepts_dict.py``, what ``pydicom.sr.codedict.codes`` looks keywords up in):
a Python literal of 18,735 keywords whose import takes ~0.1 s and holds 15 MB of objects, for
the dozen codes the SR and the evidence capture name. The lazy dictionary keeps the file's
text (1.9 MB) and parses a keyword's entry when it is first looked up.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import json
import logging
import re
import sys
import types
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: A top-level key of the pretty-printed table and where its value starts.
_TOP_LEVEL_KEY = re.compile(rb'\n  ("(?:[^"\\]|\\.)*"):\s*')

_TABLE = ("highdicom", "_standard/module_attribute_map.json")

#: The highdicom modules that look the table up through a module-level name.
_USERS = ("highdicom._standard_utils", "highdicom.base", "highdicom.image")


class LazyModuleTable(Mapping[str, list[dict[str, Any]]]):
    """PS3.3's module -> attributes table, each module's list read and parsed on first lookup.

    Only the byte range of each module's entry is kept (the file's text is not: 22 MB)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        data = path.read_bytes()
        matches = list(_TOP_LEVEL_KEY.finditer(data))
        # each entry runs from its value's start to the next key's line
        ends = [m.start() for m in matches[1:]] + [len(data)]
        self._ranges: dict[str, tuple[int, int]] = {
            json.loads(m.group(1)): (m.end(), end) for m, end in zip(matches, ends, strict=True)
        }
        self._parsed: dict[str, list[dict[str, Any]]] = {}
        self._whole: dict[str, list[dict[str, Any]]] | None = None
        if not self._ranges:
            log.warning("highdicom's module table has another layout: reading it whole")
            self._whole = json.loads(data)

    def __getitem__(self, key: str) -> list[dict[str, Any]]:
        if self._whole is not None:
            return self._whole[key]
        if key not in self._parsed:
            start, end = self._ranges[key]
            with self._path.open("rb") as fh:
                fh.seek(start)
                text = fh.read(end - start).decode("utf-8")
            value, _ = json.JSONDecoder().raw_decode(text)
            self._parsed[key] = value
        return self._parsed[key]

    def _keys(self) -> Mapping[str, object]:
        return self._whole if self._whole is not None else self._ranges

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: object) -> bool:
        return key in self._keys()


@functools.cache
def module_attribute_map() -> LazyModuleTable:
    """What ``highdicom._standard_utils.get_module_attribute_map`` returns, lazily."""
    with resources.as_file(resources.files(_TABLE[0]) / _TABLE[1]) as path:
        return LazyModuleTable(Path(path))


def install() -> None:
    """Point highdicom's lookups of the table at :func:`module_attribute_map` (idempotent).

    highdicom's own function is private API: where a release renames it, nothing is replaced
    and highdicom reads the whole table as before (``tests/test_standard_tables.py`` fails,
    so the change is seen).
    """
    import importlib

    for name in _USERS:
        module = importlib.import_module(name)
        if hasattr(module, "get_module_attribute_map"):
            module.get_module_attribute_map = module_attribute_map  # type: ignore[attr-defined]


#: pydicom's module of PS3.16 concepts, and the module that imports it (``codes``).
_CONCEPTS_MODULE = "pydicom.sr._concepts_dict"
_CODEDICT_MODULE = "pydicom.sr.codedict"

#: ``concepts["SCT"] = {`` opens a coding scheme's section; ``}`` alone on a line closes it.
_SCHEME = re.compile(rb'^concepts\["([^"\\]+)"\] = \{\n', re.MULTILINE)
_SECTION_END = b"\n}\n"
#: A keyword's entry starts a line indented by four spaces (its codes are indented further).
_KEYWORD = re.compile(rb'^    "([^"\\]+)": ', re.MULTILINE)
_ENTRY_START = b'\n    "'

#: keyword -> {code value: (code meaning, [CIDs the code is in])}, as pydicom's module has it.
SchemeEntries = dict[str, tuple[str, list[int]]]


class LazyScheme(Mapping[str, SchemeEntries]):
    """One coding scheme's keywords (``concepts["DCM"]``), each entry parsed on first lookup."""

    def __init__(self, text: bytes, start: int, end: int) -> None:
        self._text, self._start, self._end = text, start, end
        self._parsed: dict[str, SchemeEntries] = {}
        self._keys: list[str] | None = None

    def __getitem__(self, keyword: str) -> SchemeEntries:
        if keyword in self._parsed:
            return self._parsed[keyword]
        if not isinstance(keyword, str) or not keyword.isprintable() or '"' in keyword:
            raise KeyError(keyword)
        needle = _ENTRY_START + keyword.encode() + b'": '
        # the section's first entry follows its opening line's newline: search from there
        at = self._text.find(needle, self._start - 1, self._end)
        if at < 0:
            raise KeyError(keyword)
        value_start = at + len(needle)
        stop = self._text.find(_ENTRY_START, value_start, self._end)
        value = self._text[value_start : self._end if stop < 0 else stop]
        entries: SchemeEntries = ast.literal_eval(value.decode("utf-8").strip().rstrip(","))
        self._parsed[keyword] = entries
        return entries

    def _keywords(self) -> list[str]:
        if self._keys is None:
            found = _KEYWORD.findall(self._text, self._start, self._end)
            self._keys = [k.decode("utf-8") for k in found]
        return self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keywords())

    def __len__(self) -> int:
        return len(self._keywords())

    def __contains__(self, keyword: object) -> bool:
        try:
            self[keyword]  # type: ignore[index]
        except KeyError:
            return False
        return True


def read_concepts(path: Path) -> Mapping[str, Mapping[str, SchemeEntries]]:
    """pydicom's ``concepts`` from its module's file at ``path``: lazily where the file has
    the layout :data:`_SCHEME` describes, else (another pydicom release, or an installation
    without the source file) by running the module as pydicom would."""
    try:
        text = path.read_bytes()
    except OSError:
        text = b""
    schemes: dict[str, Mapping[str, SchemeEntries]] = {}
    for match in _SCHEME.finditer(text):
        end = text.find(_SECTION_END, match.end() - 1)
        if end < 0:
            schemes.clear()
            break
        schemes[match.group(1).decode("utf-8")] = LazyScheme(text, match.end(), end + 1)
    if schemes:
        return schemes
    log.warning("pydicom's concept dictionary has another layout or no source: reading it whole")
    # the source file or, where only bytecode is installed, the compiled one
    spec = importlib.machinery.PathFinder.find_spec(path.stem, [str(path.parent)])
    if spec is None or spec.loader is None:
        raise ImportError(f"pydicom's concept dictionary is not in {path.parent}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    whole: dict[str, Mapping[str, SchemeEntries]] = module.concepts
    return whole


def _concepts_path() -> Path:
    # pydicom itself is being imported when this is asked (pydicom.sr.codedict imports the
    # concepts), so finding its directory imports nothing more
    return Path(resources.files("pydicom").joinpath("sr", "_concepts_dict.py"))  # type: ignore[arg-type]


def _lazy_concepts_attribute(name: str) -> object:
    if name != "concepts":
        raise AttributeError(f"module {_CONCEPTS_MODULE!r} has no attribute {name!r}")
    module = sys.modules[_CONCEPTS_MODULE]
    concepts = read_concepts(_concepts_path())
    module.concepts = concepts  # type: ignore[attr-defined]
    return concepts


def install_concepts() -> None:
    """Make pydicom's concept dictionary lazy in this process (idempotent).

    Registers a module under pydicom's name that reads the file only when ``concepts`` is
    first asked for (PEP 562), so installing it costs nothing in a process that never builds
    a DICOM object. Does nothing where ``pydicom.sr`` has already read the real one.
    """
    if _CONCEPTS_MODULE in sys.modules or _CODEDICT_MODULE in sys.modules:
        return
    module = types.ModuleType(_CONCEPTS_MODULE, "pydicom's PS3.16 concepts, read lazily")
    module.__getattr__ = _lazy_concepts_attribute  # type: ignore[method-assign]
    sys.modules[_CONCEPTS_MODULE] = module
