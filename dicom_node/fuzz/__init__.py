"""Fuzz the storage SCP: malformed objects and PDUs against the real node, on loopback.

Starts ``fracture-triage scp`` as a subprocess (SQLite in a temporary data dir, the broker
URL pointing at a closed port, so every stored object is left pending: the SCP answers
anyway), then runs ``--count`` cases, cycling through :data:`KINDS`. Run::

    python -m dicom_node.fuzz --count 1000 --seed 1

Data set cases mutate a real sample (``--samples``, the small stored-as-is radiographs),
each with a fresh SOP Instance UID, write the mutated Part 10 file and send its bytes as
they are (pynetdicom's chunked sending: nothing is decoded or re-encoded) over a fresh
association. PDU cases write to a raw socket, in a few background threads from another
loopback address (127.0.0.2) so the idle and truncated ones, which the SCP closes only at
its timeouts, overlap the other cases. ``pdu_abort_burst`` (in the foreground) opens 8
connections from each of two more addresses that the SCP aborts at once, then times a C-ECHO
from 127.0.0.1: refused is a lockout.

For every case: the outcome; whether the SCP process still runs (a crash restarts it); a
C-STORE unanswered within 35 s, or a raw connection the SCP neither answers nor closes in
its timeout plus 10 s, is a hang; a C-STORE whose association ends without a status is
unanswered. Each Success is checked: the file ``objects/<study>/<series>/<sop>.dcm`` holds
byte for byte the data set sent, and ``instances`` has the SOP Instance UID. Every 50 cases
a C-ECHO is timed and the SCP's VmRSS read. One JSON object is printed; the exit status is 0
only when crashes, hangs, unanswered, missing_or_different, echo failures and lockouts are
all 0.

Case ``i`` draws from ``random.Random(f"{seed}:{i}")``: a case is reproduced by its seed and
index alone (``--first i --count 1``); ``--verbose`` prints one line per case, ``--scp-log
FILE`` keeps the SCP's log. A Success for a SOP Instance UID stored before (a re-send) must
leave the first object in place (the node's default ``keep-first``).
"""

from __future__ import annotations

from dicom_node.fuzz.mutations import DATASET_KINDS
from dicom_node.fuzz.pdus import PDU_KINDS

#: Data set mutations, then PDU-level cases; case ``i`` is of kind ``KINDS[i % len(KINDS)]``.
KINDS = DATASET_KINDS + PDU_KINDS

from dicom_node.fuzz.checks import Report  # noqa: E402 - after KINDS, which cli imports
from dicom_node.fuzz.cli import main, run  # noqa: E402

__all__ = ["KINDS", "Report", "main", "run"]
