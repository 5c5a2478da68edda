"""The stored results, as rows for ``fracture-triage results``.

One row per received instance with its latest classification (probability, the two
thresholds, the ``fracture`` flag and the ``decision`` level), its study's decision
(``study_decision``: the highest level among the study's classified images, as the worklist
ranks it), the path of its study's latest Structured Report and that SR's deliveries (one
per destination: state pending, sent or gave up, attempts, last error, next attempt).
Patient identifiers are left out unless explicitly asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.deliveries import latest_deliveries
from db.models import Evidence, Instance, InstanceStatus, Result, Series, SRDocument, Study
from db.repository import as_utc
from db.triage import decision_of_priority, latest_results, study_priorities
from fracture_triage.attributes import PATIENT_IDENTIFIERS
from fracture_triage.verdict import DECISION_ORDER


def collect_results(
    session: Session,
    study_instance_uid: str | None = None,
    include_patient: bool = False,
    *,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Every instance (optionally of one study), oldest first, as JSON-ready dicts; ``limit``
    and ``offset`` page through them in SQL (``GET /api/v1/results``)."""
    latest_result_id = latest_results()
    levels = study_priorities()
    query = (
        select(Instance, Series, Study, Result, Evidence, levels.c.priority)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .outerjoin(latest_result_id, latest_result_id.c.instance_id == Instance.id)
        .outerjoin(Result, Result.id == latest_result_id.c.result_id)
        .outerjoin(levels, levels.c.study_id == Study.id)
        .outerjoin(Evidence, Evidence.result_id == Result.id)
        .order_by(Instance.id)
    )
    if study_instance_uid:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    if limit is not None:
        query = query.limit(limit).offset(offset)

    # The latest report of each study: the newest SR that nothing supersedes.
    latest_sr: dict[int, SRDocument] = {}
    for doc in session.scalars(
        select(SRDocument).where(SRDocument.superseded_by_id.is_(None)).order_by(SRDocument.id)
    ):
        latest_sr[doc.study_id] = doc
    deliveries = latest_deliveries(session)

    rows: list[dict[str, Any]] = []
    for instance, series, study, result, evidence, priority in session.execute(query).tuples():
        sr = latest_sr.get(study.id)
        study_decision = decision_of_priority(priority)
        row: dict[str, Any] = {
            "sop_instance_uid": instance.sop_instance_uid,
            "study_instance_uid": study.study_instance_uid,
            "series_instance_uid": series.series_instance_uid,
            "sop_class_uid": instance.sop_class_uid,
            "modality": series.modality,
            "body_part_examined": series.body_part_examined,
            "received_at": as_utc(instance.received_at).isoformat(),
            "status": instance.status.value,
            "probability": None if result is None else round(float(result.probability), 6),
            "fracture": None if result is None else bool(result.fracture),
            "decision": None if result is None else result.decision.value,
            "threshold": None if result is None else float(result.threshold),
            "upper_threshold": None if result is None else float(result.upper_threshold),
            "model_name": None if result is None else result.model_name,
            "model_version": None if result is None else result.model_version,
            # why there is no result: the failure, or "not assessed: out of scope (PART)"
            "failure_reason": instance.failure_reason,
            # The result's evidence Secondary Capture (heat map): its file, or why none.
            "evidence_path": None if evidence is None else evidence.path,
            "evidence_state": None if evidence is None else evidence.state.value,
            "evidence_reason": None if evidence is None else evidence.reason,
            "sr_path": None if sr is None else sr.path,
            "sr_sop_instance_uid": None if sr is None else sr.sop_instance_uid,
            "study_fracture": None if sr is None else bool(sr.fracture),
            # The study's decision over its classified images now (None: none classified).
            "study_decision": None if study_decision is None else study_decision.value,
            # Why the study's report could not be built (not retried until a new image).
            "report_failure": study.report_failure,
            # The latest SR's delivery to each destination (empty: none configured).
            "deliveries": deliveries.get(study.id, []),
        }
        if include_patient:
            for name in PATIENT_IDENTIFIERS:
                row[name] = getattr(study, name)
        rows.append(row)
    return rows


def write_json_lines(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    for row in rows:
        out.write(json.dumps(row, sort_keys=False) + "\n")


def _cell(value: Any, width: int | None = None) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.3f}"
    else:
        text = str(value)
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def write_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    """A readable table: one line per instance, grouped by study in arrival order."""
    if not rows:
        out.write("no instances received yet\n")
        return
    columns = [
        ("STATUS", "status", None),
        ("PROB", "probability", None),
        ("DECISION", "decision", None),
        ("STUDY INSTANCE UID", "study_instance_uid", None),
        ("SOP INSTANCE UID", "sop_instance_uid", None),
        ("DELIVERIES", "deliveries", None),
        ("FAILURE / NOT ASSESSED / SR", None, 70),
    ]
    table: list[list[str]] = []
    for row in rows:
        cells = []
        for _, key, width in columns:
            if key == "deliveries":
                value = delivery_cell(row["deliveries"])
            elif key is None:
                value = row["failure_reason"] or row["sr_path"]
                if value is None and row["report_failure"]:
                    value = f"report failed: {row['report_failure']}"
            else:
                value = row[key]
            cells.append(_cell(value, width))
        table.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, (h, _, _) in enumerate(columns)]
    out.write("  ".join(h.ljust(w) for (h, _, _), w in zip(columns, widths, strict=True)).rstrip())
    out.write("\n")
    for cells in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n")
    done = sum(r["status"] == "done" for r in rows)
    levels = ", ".join(
        f"{sum(r['decision'] == d.value for r in rows)} {d.value}" for d in DECISION_ORDER
    )
    failed = sum(r["status"] == "failed" for r in rows)
    left_out = sum(r["status"] == InstanceStatus.out_of_scope.value for r in rows)
    gave_up = {
        (r["study_instance_uid"], d["destination"])
        for r in rows
        for d in r["deliveries"]
        if d["state"] == "gave up"
    }
    studies = len({r["study_instance_uid"] for r in rows})
    reported = len({r["study_instance_uid"] for r in rows if r["sr_path"]})
    out.write(
        f"{len(rows)} instances in {studies} studies: {done} classified ({levels}), "
        f"{failed} failed, {left_out} not assessed (out of scope), "
        f"{len(rows) - done - failed - left_out} waiting; {reported} studies reported\n"
    )
    if gave_up:
        out.write(
            f"{len(gave_up)} deliveries GAVE UP: see `results --json` for the error; "
            "`fracture-triage resend --failed` tries them again\n"
        )


def delivery_cell(deliveries: list[dict[str, Any]]) -> str:
    """``pacs:sent ris:GAVE-UP(3)``: each destination's state, the gave-up ones loud, the
    pending ones with their failed attempts so far."""
    if not deliveries:
        return "-"
    parts = []
    for d in deliveries:
        state = d["state"]
        if state == "gave up":
            state = f"GAVE-UP({d['attempts']})"
        elif state == "pending" and d["attempts"]:
            state = f"retrying({d['attempts']})"
        parts.append(f"{d['destination']}:{state}")
    return " ".join(parts)
