"""Settings as an administrator writes them in the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fracture_triage.settings import Settings


@pytest.mark.parametrize("value", ["MOD1,PACS", " MOD1 , PACS ", '["MOD1", "PACS"]'])
def test_allowed_calling_aets_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FRACTURE_TRIAGE_ALLOWED_CALLING_AETS", value)
    assert Settings().allowed_calling_aets == ["MOD1", "PACS"]


def test_ae_title_longer_than_16_characters_is_refused() -> None:
    with pytest.raises(ValidationError, match="1-16 characters"):
        Settings(ae_title="A_VERY_LONG_AE_TITLE")


def test_every_setting_is_in_the_readme_table() -> None:
    """Each field is in README's settings table: ``FRACTURE_TRIAGE_NAME``, or a tail of its
    name (```_PORT```) in a row that groups it with a sibling."""
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    table = text[text.index("## Settings") : text.index("## Deploying in a hospital")]
    missing = []
    for name in Settings.model_fields:
        parts = name.upper().split("_")
        tails = [f"`_{'_'.join(parts[i:])}`" for i in range(len(parts))]
        if f"FRACTURE_TRIAGE_{name.upper()}" not in table and not any(t in table for t in tails):
            missing.append(name)
    assert missing == []
