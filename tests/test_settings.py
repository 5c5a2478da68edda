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
