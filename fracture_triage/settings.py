"""One typed settings object, built at the entry point and passed down.

Values come from keyword arguments, then ``FRACTURE_TRIAGE_*`` environment variables,
then the defaults below. Nothing here opens a connection or reads a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The default scope (``fracture_triage.scope``): the Body Part Examined (0018,0015) defined
#: terms of PS3.16 Annex L (Table L-1, as highdicom ships it: ``tests/test_scope.py`` checks
#: each against that table) for the limbs, their joints and girdles, and the pelvis and hips;
#: ARM and LEG, PS3.3's older terms that modalities still send; and the empty value.
DEFAULT_BODY_PARTS: tuple[str, ...] = (
    # upper limb and shoulder girdle
    "UPPERLIMB",
    "SHOULDER",
    "ACJOINT",
    "SCJOINT",
    "CLAVICLE",
    "SCAPULA",
    "UPPERARM",
    "HUMERUS",
    "ELBOW",
    "FOREARM",
    "RADIUS",
    "ULNA",
    "WRIST",
    "HAND",
    "FINGER",
    "THUMB",
    # either limb, any joint
    "EXTREMITY",
    "JOINT",
    # pelvis, hip and lower limb
    "PELVIS",
    "PELVISLOWEXTREMT",
    "SIJOINT",
    "HIP",
    "LOWERLIMB",
    "THIGH",
    "FEMUR",
    "KNEE",
    "PATELLA",
    "LOWERLEG",
    "TIBIA",
    "FIBULA",
    "ANKLE",
    "FOOT",
    "CALCANEUS",
    "TOE",
    # PS3.3's earlier defined terms, still sent by modalities
    "ARM",
    "LEG",
    # Type 3: absent or empty is common on radiographs of limbs
    "",
)

#: Defaults that are not PS3.16 Annex L terms (see above).
LEGACY_BODY_PARTS: frozenset[str] = frozenset({"ARM", "LEG", ""})

#: The name the ``sr_destination_*`` settings' destination goes by (and the deliveries that
#: revision 0009 made of the SRs sent before it).
LEGACY_DESTINATION = "sr_destination"


def check_ae_title(value: str) -> str:
    """``value`` stripped, if it is an AE title; ``ValueError`` otherwise."""
    # PS3.5 Table 6.2-1: AE is 1-16 characters of the default repertoire, not all spaces.
    if not 0 < len(value.strip()) <= 16 or "\\" in value:
        raise ValueError(f"AE title must be 1-16 characters without backslash: {value!r}")
    return value.strip()


class Destination(BaseModel):
    """One place every produced result goes: a DICOM node (the SR and the evidence
    Secondary Captures, C-STORE, PS3.4 B.2) or a RIS (an HL7 v2.5.1 ORU^R01 over MLLP)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Unique among the destinations: the deliveries' key, shown in results and resend.
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["dicom", "hl7"]
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    #: dicom only: the destination's (called) AE title.
    ae_title: str | None = None
    #: dicom only: DICOM over TLS (PS3.15 Annex B), verifying the peer against ``tls_ca``
    #: (or the system's CAs) and offering the node's ``tls_cert`` when it has one.
    tls: bool = False
    tls_ca: Path | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> Destination:
        if self.kind == "dicom":
            if self.ae_title is None:
                raise ValueError(f"destination {self.name!r}: a dicom destination needs ae_title")
            object.__setattr__(self, "ae_title", check_ae_title(self.ae_title))
        elif self.ae_title is not None or self.tls or self.tls_ca is not None:
            raise ValueError(
                f"destination {self.name!r}: an hl7 destination takes host and port only "
                "(no ae_title, tls or tls_ca)"
            )
        if self.tls_ca is not None and not self.tls:
            raise ValueError(f"destination {self.name!r}: tls_ca is given but tls is false")
        return self


def parse_destinations(value: object) -> list[Destination]:
    """The ``FRACTURE_TRIAGE_DESTINATIONS`` list (JSON text or a list of dicts), checked:
    each entry by :class:`Destination`, names unique. ``ValueError`` names the entry (by
    position and name) and the field at fault."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"FRACTURE_TRIAGE_DESTINATIONS is not JSON: {exc}") from None
    if not isinstance(value, list):
        raise ValueError("FRACTURE_TRIAGE_DESTINATIONS must be a JSON list of objects")
    out: list[Destination] = []
    for index, item in enumerate(value):
        if isinstance(item, Destination):
            out.append(item)
            continue
        label = f"destination #{index + 1}"
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            label += f" ({item['name']!r})"
        try:
            out.append(Destination.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                (".".join(map(str, e["loc"])) + ": " if e["loc"] else "")
                + e["msg"].removeprefix("Value error, ")
                for e in exc.errors()
            )
            raise ValueError(f"{label}: {problems}") from None
    names = [d.name for d in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"destination names must be unique: {', '.join(twice)} given twice")
    return out


class Settings(BaseSettings):
    """Everything a role (SCP, worker, sweeper, CLI) needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix="FRACTURE_TRIAGE_", extra="ignore")

    data_dir: Path = Path("./data")
    #: SQLAlchemy URL; default ``sqlite:///<data_dir>/triage.db``.
    database_url: str | None = None
    broker_url: str = "redis://127.0.0.1:6379/0"

    # DICOM storage SCP
    ae_title: str = "FXTRIAGE"
    bind_address: str = "127.0.0.1"
    #: The plain DICOM port; 0: none (only the TLS port, which must then be configured).
    dicom_port: int = Field(default=11112, ge=0, le=65535)
    #: 128 KiB: pynetdicom's 16 KiB default halves throughput on large radiographs.
    max_pdu: int = 131072
    #: Calling AE titles allowed to associate; empty means any. In the environment either a
    #: comma-separated list (``MOD1,PACS``) or a JSON list.
    allowed_calling_aets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Peers allowed to associate as ``AE_TITLE@ADDRESS`` or ``AE_TITLE@NETWORK/PREFIX``
    #: (an AE title alone: from any address), listed like ``allowed_calling_aets`` (which
    #: adds its titles from any address); both empty: anyone (``dicom_node.peers``).
    allowed_peers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Accept associations whatever called AE title they name (compatibility with senders
    #: configured with another); otherwise only ``ae_title`` (A-ASSOCIATE-RJ reason 7).
    accept_any_called_aet: bool = False
    #: Seconds one PDU may take to arrive once its first byte has: a peer dribbling bytes
    #: is cut off (between PDUs the idle timeout below applies).
    dicom_read_timeout_seconds: float = Field(default=30.0, gt=0)
    #: Seconds from connection to a complete A-ASSOCIATE-RQ, and to an A-RELEASE-RP
    #: (pynetdicom's ``acse_timeout``).
    dicom_acse_timeout_seconds: float = Field(default=30.0, gt=0)
    #: Seconds an established association may stay idle before it is aborted (pynetdicom's
    #: ``network_timeout``).
    dicom_network_timeout_seconds: float = Field(default=60.0, gt=0)
    #: Associations (and connections still negotiating) one peer address may hold at once,
    #: of the SCP's 16; further connections from it are closed unanswered.
    max_associations_per_peer: int = Field(default=8, ge=1)
    #: The reserve of free space kept on the data directory's file system: the smaller of
    #: these (0 turns one off); a C-STORE that would go below it is answered 0xA700 Out of
    #: Resources (``fracture_triage.disk``).
    min_free_bytes: int = Field(default=5 * 1024**3, ge=0)
    min_free_percent: float = Field(default=10.0, ge=0, le=100)
    #: Largest data set received in one C-STORE (pynetdicom holds it in memory until it is
    #: whole): more and the association is aborted (``dicom_node.object_size``).
    max_object_bytes: int = Field(default=256 * 1024**2, ge=1)
    #: Largest Rows x Columns x Samples accepted, to refuse absurd headers before decoding.
    max_pixels: int = 100_000_000
    #: Body Part Examined (0018,0015) values that are classified (``fracture_triage.scope``),
    #: compared stripped and case-insensitively; an empty entry admits an empty or absent
    #: value, ``*`` every image. Others are stored and recorded "not assessed: out of
    #: scope". Comma list or JSON list in the environment (``""`` in a JSON list: empty).
    body_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_BODY_PARTS)
    )
    #: A SOP Instance UID received again with different content: ``keep-first`` stores
    #: nothing new (the stored object and its result stand), ``keep-newest`` replaces the
    #: stored file atomically and classifies it again. Either way Success is answered and the
    #: conflict is logged and counted on the instance (``conflicting_resends``).
    duplicate_policy: Literal["keep-first", "keep-newest"] = "keep-first"
    #: Niceness the worker role adds to itself (and its pool children) at start: on a node
    #: whose cores the worker's inference would fill, the SCP (which must answer each
    #: C-STORE of a modality) gets the CPU first and the classification backlog waits; 0:
    #: the same priority as the other roles (``worker.celery_app.run_worker``).
    worker_nice: int = Field(default=10, ge=0, le=19)
    #: CPU threads of one inference (LiteRT); ``None``: every core this process may use. With
    #: ``--concurrency N`` worker processes, cores / N keeps them from competing.
    inference_threads: int | None = Field(default=None, ge=1)

    # Model
    #: model folder; ``None``: the model the package ships (``model.artifact.resolve_model_dir``)
    model_dir: Path | None = None

    # Study reporting
    #: A study is reported once no instance has arrived for this many seconds.
    study_stable_seconds: float = 10.0
    sweeper_interval_seconds: float = 2.0
    #: Where SRs are sent with C-STORE; all three must be set to send.
    sr_destination_host: str | None = None
    sr_destination_port: int | None = None
    sr_destination_ae_title: str | None = None
    #: Deprecated name of ``delivery_max_attempts`` (used when that is unset).
    sr_send_retries: int | None = Field(default=None, ge=1)
    #: Where every result goes (``Destination``): a JSON list in the environment, e.g.
    #: ``[{"name": "pacs", "kind": "dicom", "host": "10.0.0.5", "port": 104,
    #: "ae_title": "PACS"}, {"name": "ris", "kind": "hl7", "host": "10.0.0.6", "port": 2575}]``.
    #: The ``sr_destination_*`` settings above, when set, add one more dicom destination
    #: named ``sr_destination`` (``LEGACY_DESTINATION``).
    destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    #: Each delivery is retried with ``fracture_triage.backoff`` (30 s doubling to 4 h) until
    #: this many attempts (unset: no limit by count) or this many hours after it was put
    #: pending, then it "gave up" (``fracture-triage resend`` puts it back).
    delivery_max_attempts: int | None = Field(default=None, ge=1)
    delivery_max_age_hours: float = Field(default=72.0, gt=0)

    # The web application (api/): its own bind address, so that opening the SCP to the
    # modalities (bind_address 0.0.0.0) does not open the worklist too.
    http_port: int = 8080
    http_bind_address: str = "127.0.0.1"
    #: Host header values answered (DNS rebinding defence); ``*`` allows any. Empty: the
    #: loopback names plus ``http_bind_address`` when it is a specific address. Comma list
    #: or JSON list in the environment.
    http_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: Largest request body accepted (forms and JSON are small); larger ones get 413.
    http_max_body_bytes: int = Field(default=65536, ge=1024)
    #: Seconds an idle keep-alive connection is held open.
    http_idle_timeout_seconds: float = Field(default=5.0, gt=0)
    #: Connections served at once; more get 503 (uvicorn ``limit_concurrency``).
    http_max_connections: int = Field(default=200, ge=1)
    #: PEM certificate and key: the application speaks HTTPS (needed beyond loopback, for the
    #: ``Secure`` session cookie). Unset while ``tls_cert``/``tls_key`` are set: HTTPS with
    #: the DICOM TLS certificate (``http_tls_files``).
    http_tls_certfile: Path | None = None
    http_tls_keyfile: Path | None = None
    #: Hours a browser session lasts after login.
    session_hours: float = Field(default=12.0, gt=0)
    #: Longest side in pixels of the preview images the study page shows.
    preview_size: int = Field(default=1024, ge=64, le=4096)

    # Retention (fracture_triage.retention, ``fracture-triage purge``)
    #: Days after its study's SR was sent (or produced, with no destination) that a received
    #: object's file is deleted (refused objects: after they arrived); unset: kept for ever.
    retention_days: float | None = Field(default=None, gt=0)
    #: Days after sending (or producing) that the node's own SR files are deleted.
    sr_retention_days: float | None = Field(default=None, gt=0)
    #: Days the record of each refused C-STORE (``store_refusals``, no patient data) is kept;
    #: older ones are deleted by ``purge`` and hourly by the sweeper, and stay counted in
    #: ``/metrics``. Always on: a flood of refusals must not fill the database.
    refusal_retention_days: float = Field(default=30.0, gt=0)

    # DICOM over TLS (PS3.15 Annex B; dicom_node.tls)
    #: The node's certificate chain and private key (PEM): both set serve TLS on ``tls_port``.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: 2762: IANA's port for DICOM over TLS. ``dicom_port`` 0 leaves only this one open.
    tls_port: int = Field(default=2762, ge=0, le=65535)
    #: CA certificates (PEM) client certificates must chain to; set: mutual TLS, required.
    tls_ca: Path | None = None
    #: Send SRs to their destination over TLS, verifying its certificate against
    #: ``sr_destination_tls_ca`` (or the system's CAs) and offering ``tls_cert`` when set.
    sr_destination_tls: bool = False
    sr_destination_tls_ca: Path | None = None

    @field_validator("ae_title", "sr_destination_ae_title")
    @classmethod
    def _check_ae_title(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value)

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: object) -> list[Destination]:
        return parse_destinations(value)

    @field_validator("allowed_calling_aets", "allowed_peers", "http_allowed_hosts", mode="before")
    @classmethod
    def _split_aets(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [v.strip() for v in text.split(",") if v.strip()]
        return value

    @field_validator("body_parts", mode="before")
    @classmethod
    def _split_body_parts(cls, value: object) -> object:
        # A comma list keeps an empty entry (",HAND" admits an empty value); JSON as above.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [v.strip() for v in text.split(",")]
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("FRACTURE_TRIAGE_TLS_CERT and FRACTURE_TRIAGE_TLS_KEY go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("FRACTURE_TRIAGE_TLS_CA needs FRACTURE_TRIAGE_TLS_CERT and _KEY")
        if (self.http_tls_certfile is None) != (self.http_tls_keyfile is None):
            raise ValueError(
                "FRACTURE_TRIAGE_HTTP_TLS_CERTFILE and FRACTURE_TRIAGE_HTTP_TLS_KEYFILE go together"
            )
        if self.dicom_port == 0 and self.tls_cert is None:
            raise ValueError(
                "FRACTURE_TRIAGE_DICOM_PORT=0 turns the plain port off: it needs TLS "
                "(FRACTURE_TRIAGE_TLS_CERT and FRACTURE_TRIAGE_TLS_KEY)"
            )
        if self.sr_destination is not None and LEGACY_DESTINATION in {
            d.name for d in self.destinations
        }:
            raise ValueError(
                f"destination name {LEGACY_DESTINATION!r} is the FRACTURE_TRIAGE_SR_DESTINATION_* "
                "destination's: name the FRACTURE_TRIAGE_DESTINATIONS entry otherwise"
            )
        return self

    @property
    def max_delivery_attempts(self) -> int | None:
        """Failed attempts after which a delivery gives up (None: only its age counts)."""
        if self.delivery_max_attempts is not None:
            return self.delivery_max_attempts
        return self.sr_send_retries

    @property
    def all_destinations(self) -> list[Destination]:
        """Every destination: ``destinations`` and the ``sr_destination_*`` one, if set."""
        out = list(self.destinations)
        legacy = self.sr_destination
        if legacy is not None:
            host, port, aet = legacy
            out.append(
                Destination(
                    name=LEGACY_DESTINATION,
                    kind="dicom",
                    host=host,
                    port=port,
                    ae_title=aet,
                    tls=self.sr_destination_tls,
                    # the CA means nothing without TLS (as before: ignored)
                    tls_ca=self.sr_destination_tls_ca if self.sr_destination_tls else None,
                )
            )
        return out

    @property
    def sends_dicom(self) -> bool:
        """Whether a dicom destination is configured (evidence captures are then sent)."""
        return any(d.kind == "dicom" for d in self.all_destinations)

    def destination(self, name: str) -> Destination | None:
        """The configured destination called ``name``, if any."""
        return next((d for d in self.all_destinations if d.name == name), None)

    @property
    def tls_enabled(self) -> bool:
        """Whether the SCP serves DICOM over TLS on ``tls_port``."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def http_tls_files(self) -> tuple[Path, Path] | None:
        """The (certificate, key) the web application serves HTTPS with: its own pair when
        both are set, else the node's DICOM TLS pair (one certificate for the node, as the
        security review asks), else None (plain HTTP)."""
        if self.http_tls_certfile is not None and self.http_tls_keyfile is not None:
            return self.http_tls_certfile, self.http_tls_keyfile
        if self.tls_cert is not None and self.tls_key is not None:
            return self.tls_cert, self.tls_key
        return None

    @property
    def storage_dir(self) -> Path:
        """Received objects, stored as received."""
        return self.data_dir / "objects"

    @property
    def sr_dir(self) -> Path:
        """Structured Reports produced by the node."""
        return self.data_dir / "sr"

    @property
    def preview_dir(self) -> Path:
        """Rendered preview images (patient data: readable by the node's user only)."""
        return self.data_dir / "previews"

    @property
    def resolved_allowed_hosts(self) -> list[str]:
        """Host header names the web application answers (without port)."""
        if self.http_allowed_hosts:
            return list(self.http_allowed_hosts)
        hosts = ["127.0.0.1", "localhost", "::1"]
        if self.http_bind_address not in ("0.0.0.0", "::", "", *hosts):
            hosts.append(self.http_bind_address)
        return hosts

    @property
    def evidence_dir(self) -> Path:
        """Evidence Secondary Captures (heat maps) produced by the node."""
        return self.data_dir / "evidence"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"

    @property
    def sr_destination(self) -> tuple[str, int, str] | None:
        if self.sr_destination_host and self.sr_destination_port and self.sr_destination_ae_title:
            return (
                self.sr_destination_host,
                self.sr_destination_port,
                self.sr_destination_ae_title,
            )
        return None
