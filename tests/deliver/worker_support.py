"""A queue on a throwaway SQLite file and a delivery worker on it: shared by the worker tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from mailhub.config import DeliveryConfig, HostPort
from mailhub.crypto.atrest import AtRest
from mailhub.deliver import payloads, queue
from mailhub.deliver.payload_files import PayloadFiles
from mailhub.deliver.worker import DeliveryWorker
from mailhub.store.models import OutboundItem
from tests.deliver.smtp_double import SmtpDouble

SENDER = "coord@medvoyage.example"


@dataclass
class Store:
    engine: Engine
    sealer: AtRest
    root: Path
    failed: list[tuple[int, str]] = field(default_factory=list)
    files: PayloadFiles | None = None  # large payloads in segment files, when set

    def enqueue(self, recipient: str, body: bytes, *, payload: bool = True,
                **values: object) -> int:
        with Session(self.engine) as session:
            pid = (payloads.insert_payload(session, body, self.sealer, self.files)
                   if payload else None)
            n = len(queue.list_items(self.engine))
            item = queue.insert_item(session, source_id=f"spool-{n}", message_id=f"<m{n}@pc>",
                                     sender=SENDER, recipient=recipient, payload_id=pid,
                                     **values)
            session.commit()
            return item

    def row(self, item_id: int) -> OutboundItem:
        with Session(self.engine) as session:
            row = session.get(OutboundItem, item_id)
            assert row is not None
            return row


def make_worker(store: Store, server: SmtpDouble, *, commits: bool = True,
                internal: SmtpDouble | None = None, **cfg: object) -> DeliveryWorker:
    config = DeliveryConfig(**{  # type: ignore[arg-type]
        "smarthost": HostPort("127.0.0.1", server.port), "workers": 2, "retry_initial": 60,
        "internal_relay": HostPort("127.0.0.1", internal.port) if internal else None, **cfg})
    return DeliveryWorker(store.engine, store.sealer, config, helo="medvoyage.example",
                          commits=queue.GroupCommit(store.engine) if commits else None,
                          files=store.files,
                          on_failed=lambda _, item, reply: store.failed.append((item.id, reply)))


def drain(worker: DeliveryWorker) -> None:
    """One batch, every send finished, every outcome committed; then the worker shut down."""
    worker.run_batch()
    worker.wait_idle()
    worker.close()
    if worker.commits is not None:
        worker.commits.close()  # finishes the queued sent marks first
