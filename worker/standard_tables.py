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
"""

from __future__ import annotations

import functools
import json
import logging
import re
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
