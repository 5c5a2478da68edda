"""The patient and study attributes the node keeps per study: one list for every role.

The SCP reads them from a received object, the database stores them on the study, the SR
falls back to them when no source header can be read, and the results and the query API
leave the patient identifiers out unless asked. Values are patient data: never log them.
Imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyAttribute:
    #: Column of ``studies`` and field of ``db.repository.ReceivedInstance``.
    name: str
    #: DICOM keyword (PS3.6) in the Patient or General Study module.
    keyword: str
    #: Type 2 in its module (PS3.3 C.7.1.1, C.7.2.1): present in the SR, empty if unknown.
    type2: bool
    #: Identifies the patient: left out of results and the API unless explicitly asked for.
    identifies_patient: bool = False


STUDY_ATTRIBUTES: tuple[StudyAttribute, ...] = (
    StudyAttribute("patient_id", "PatientID", type2=True, identifies_patient=True),
    StudyAttribute("patient_name", "PatientName", type2=True, identifies_patient=True),
    StudyAttribute("patient_birth_date", "PatientBirthDate", type2=True, identifies_patient=True),
    StudyAttribute("patient_sex", "PatientSex", type2=True),
    StudyAttribute("accession_number", "AccessionNumber", type2=True, identifies_patient=True),
    StudyAttribute("study_id", "StudyID", type2=True),
    StudyAttribute("study_date", "StudyDate", type2=True),
    StudyAttribute("study_time", "StudyTime", type2=True),
    StudyAttribute("study_description", "StudyDescription", type2=False),
    StudyAttribute("referring_physician_name", "ReferringPhysicianName", type2=True),
)

#: Attribute names (``studies`` columns) of :data:`STUDY_ATTRIBUTES`, in order.
STUDY_FIELDS: tuple[str, ...] = tuple(a.name for a in STUDY_ATTRIBUTES)
#: The ones that identify a person (``--include-patient``, ``include_patient=1``).
PATIENT_IDENTIFIERS: tuple[str, ...] = tuple(
    a.name for a in STUDY_ATTRIBUTES if a.identifies_patient
)
