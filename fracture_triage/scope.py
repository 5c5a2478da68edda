"""Scope: which radiographs the fracture model is asked about, by Body Part Examined.

The model was trained and validated on limb, joint and pelvis/hip radiographs; a chest film
(or a skull, a spine) is outside what its card describes, and a probability for it would be
a number without meaning. So an image is classified only when its Body Part Examined
(0018,0015), a CS of the General Series module (PS3.3 C.7.3.1), is in an allow-list
(``Settings.body_parts``); other images are stored and recorded as *not assessed: out of
scope (PART)*, and the study's SR says so.

The default list holds the limb, joint and pelvis/hip values among the Body Part Examined
defined terms of PS3.16 Annex L ("Correspondence of Anatomic Region Codes and Body Part
Examined Defined Terms", the code strings mapped to the SNOMED CT regions of CID 4031
"Common Anatomic Regions"; the first eight of them, with EXTREMITY, ARM and LEG, are the
original PS3.3 C.7.3.1 list), plus an empty or absent value: many modalities leave the
attribute empty (it is Type 3), and refusing those would miss most real hand and wrist
films. The list itself is ``fracture_triage.settings.DEFAULT_BODY_PARTS`` (the settings
import nothing of the project); this module holds the rule that applies it.
"""

from __future__ import annotations

from collections.abc import Iterable

from fracture_triage.settings import DEFAULT_BODY_PARTS

__all__ = ["ANY", "DEFAULT_BODY_PARTS", "in_scope", "normalise", "out_of_scope_reason"]

#: In ``Settings.body_parts``: every image is in scope, whatever its body part.
ANY = "*"


def normalise(body_part: str | None) -> str:
    """The value as compared: leading and trailing spaces removed (a CS is padded to even
    length with a space, PS3.5 6.2), upper case (the defined terms are upper case, but
    modalities write ``Hand`` too); ``None`` (absent) is the empty value."""
    return (body_part or "").strip().upper()


def in_scope(body_part: str | None, allowed: Iterable[str]) -> bool:
    """Whether an image with this Body Part Examined is classified: its normalised value is
    in ``allowed`` (compared normalised too), or ``allowed`` holds :data:`ANY`."""
    values = {normalise(a) for a in allowed}
    return ANY in values or normalise(body_part) in values


def out_of_scope_reason(body_part: str | None) -> str:
    """What the results and the SR say of an image left out: ``not assessed: out of scope
    (CHEST)``. The body part is a CS (at most 16 characters of A-Z, 0-9, space and
    underscore), not patient data; anything else in it is replaced so the text stays plain;
    an empty or absent one (out of scope only when the list leaves out the empty value) is
    shown as ``empty``."""
    shown = "".join(c if c.isalnum() or c in " _" else "?" for c in normalise(body_part)[:16])
    return f"not assessed: out of scope ({shown or 'empty'})"
