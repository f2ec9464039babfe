"""The mail flow of the filing benchmark: realistic case mail, generated as it is filed.

Patients write a first contact (no tag, no References), then the case's conversation goes on:
patients reply with In-Reply-To/References (their clients' reply prefixes, sometimes with the
``[ID]`` tag the coordinator's mail carried), partner clinics answer encrypted and signed,
coordinators write fresh mail tagged ``[ID]`` or reply by References, patients send fresh mail
with no link at all (their one open case), and a clinic's answer sometimes arrives before the
patient's mail it answers (the parent, by IMAP, later). Duplicates re-file recent messages: the
same bytes again, or an IMAP copy with one more Received header. Deterministic for a seed.
"""

from __future__ import annotations

import base64
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from mailhub.crypto.protection import Protection

FIRST = ("ana maria joao lena mehmet aylin sofia lucas emma noah mia leon olga ivan chen "
         "wei fatima omar hana yusuf elif sara david laura marco giulia pablo lucia anders "
         "ingrid").split()
LAST = ("silva santos kaya demir yilmaz schmidt muller rossi bianchi garcia lopez novak "
        "petrov wang li haddad nasser andersen larsen jensen costa moreau dubois").split()
PATIENT_DOMAINS = tuple(f"mail{i}.example" for i in range(40)) + ("gmail.example", "web.example")
WORDS = ("appointment surgery hotel flight transfer clinic recovery dressing physiotherapy x-ray "
         "results passport visa consent deposit invoice fasting medication pain swelling stitches "
         "follow-up discharge airport taxi translator dentist implant crown knee hip scan blood "
         "test allergy insurance quote booking arrival departure room nurse doctor the a and to "
         "of in for with on my your we you is are will be please thank can when after before "
         "tomorrow monday morning evening week days hours questions attached report").split()
SUBJECTS = ("Question about my hip replacement", "Travel dates", "Hotel near the clinic",
            "Pre-op blood test results", "Flight booked", "Pain after the operation",
            "Follow-up appointment", "Invoice and deposit", "Medication list",
            "Dental implants quote", "Knee surgery inquiry", "Airport transfer")
PREFIX = {"patient": ("Re: ", "Re: ", "AW: ", "RV: ", "SV: ", "回复: "),
          "clinic": ("RE: ", "Re: "), "coord": ("Re: ",)}
KINDS = (("patient-reply", 30), ("clinic-reply", 20), ("coord-tagged", 20),
         ("patient-fresh", 15), ("coord-reply", 12), ("late-parent", 3))
PDF_B64 = base64.encodebytes(b"%PDF-1.4\n" + bytes(range(256)) * 96).replace(b"\n", b"\r\n")
CLINIC_FPR = "9F1C" * 10


@dataclass
class Planned:
    """One message to file, the case it belongs to (an index into the flow) and its kind."""

    kind: str
    case: int
    raw: bytes
    protection: Protection
    envelope_from: str
    recipients: list[str]


@dataclass
class FlowCase:
    """A case as the flow sees it: its patient, coordinator, first Subject and Message-IDs."""

    patient: str
    name: str
    coord: str
    subject: str
    thread: list[str] = field(default_factory=list)  # in the order written, root first


class MailFlow:
    """A stationary stream: ``cases`` first contacts spread evenly, follow-ups to recently
    opened cases, ``big`` messages for case 0 spread over the whole run, 2% duplicates (the
    same bytes again, or an IMAP copy with one more header), 3% of replies arriving before
    their parent. ``case_ids`` (flow index -> case id) is filled in by the caller as first
    contacts are filed, so that later mail can carry ``[ID]`` tags."""

    def __init__(self, messages: int, cases: int, big: int, seed: int, domain: str) -> None:
        self.rng = rng = random.Random(seed)
        self.domain = domain
        dups = messages // 50
        plan = [(-1.0, "open", 0), (-0.5, "open", 1)]
        plan += [((c - rng.random() * 0.5) / cases, "open", c) for c in range(2, cases)]
        plan += [((j + rng.random() * 0.2) / big, "big", 0) for j in range(1, big)]
        plan += [(rng.random(), "dup", -1) for _ in range(dups)]
        plan += [(rng.random(), "follow", -1) for _ in range(messages - cases - big + 1 - dups)]
        plan.sort()
        self.plan = [(kind, case) for _, kind, case in plan]
        self.case_ids: dict[int, str] = {}
        self.cases: dict[int, FlowCase] = {}
        self.opened: list[int] = []
        self.recent: deque[Planned] = deque(maxlen=3000)
        self.pending: deque[Planned] = deque()
        self.clock = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
        self.count = 0

    def messages(self, n: int) -> Iterator[Planned]:
        for kind, case in self.plan[:n]:
            if kind == "open":
                planned = self.first_contact(case)
            elif kind == "big":
                planned = self.follow_up(0, late_ok=False)
            elif kind == "dup" and self.recent:
                planned = self.duplicate()
            elif self.pending:
                planned = self.pending.popleft()
            else:
                recent = [c for c in self.opened[-301:] if c][-300:]  # the big case has its own
                planned = self.follow_up(self.rng.choice(recent), late_ok=True)
            if not planned.kind.startswith("dup"):
                self.recent.append(planned)
            yield planned

    def body(self) -> str:
        rng = self.rng
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(8, 14)))
                 for _ in range(rng.randint(10, 30))]
        return "\r\n".join([*lines, "", f"ref {rng.getrandbits(64):016x}", "--", "sent by mail"])

    def build(self, kind: str, case: int, frm: tuple[str, str], to: list[str], cc: list[str],
              subject: str, refs: list[str], irt: str | None, prot: Protection,
              rcpts: list[str]) -> tuple[Planned, str]:
        self.count += 1
        self.clock += timedelta(seconds=self.rng.randint(5, 120))
        msgid = f"<{self.rng.getrandbits(64):016x}.{self.count}@{frm[1].rpartition('@')[2]}>"
        head = [f"From: {frm[0]} <{frm[1]}>", f"To: {', '.join(to)}"]
        head += [f"Cc: {', '.join(cc)}"] if cc else []
        head += [f"Subject: {subject}", f"Date: {format_datetime(self.clock)}",
                 f"Message-ID: {msgid}", "MIME-Version: 1.0"]
        head += [f"In-Reply-To: {irt}"] if irt else []
        head += [f"References: {' '.join(refs)}"] if refs else []
        text = self.body()
        if self.rng.random() < 0.05:  # a scanned report attached
            body = ('Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
                    f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n--b1\r\n"
                    "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
                    f'Content-Disposition: attachment; filename="report-{self.count}.pdf"'
                    f"\r\n\r\n{PDF_B64.decode()}--b1--\r\n")
        else:
            body = f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
        raw = ("\r\n".join(head) + "\r\n" + body).encode("utf-8")
        return Planned(kind, case, raw, prot, frm[1], rcpts), msgid

    def first_contact(self, case: int) -> Planned:
        rng = self.rng
        first, last = rng.choice(FIRST), rng.choice(LAST)
        fc = FlowCase(f"{first}.{last}{case}@{rng.choice(PATIENT_DOMAINS)}",
                      f"{first.title()} {last.title()}", f"coord{rng.randrange(25)}@{self.domain}",
                      rng.choice(SUBJECTS))
        self.cases[case] = fc
        self.opened.append(case)
        intake = f"intake@{self.domain}"
        planned, msgid = self.build("open", case, (fc.name, fc.patient), [intake], [],
                                    fc.subject, [], None, Protection("none", "none"), [intake])
        fc.thread.append(msgid)
        return planned

    def follow_up(self, case: int, *, late_ok: bool) -> Planned:
        rng, fc = self.rng, self.cases[case]
        names, weights = zip(*KINDS, strict=True)
        kind = rng.choices(names, weights)[0]
        if kind == "late-parent" and not late_ok:
            kind = "patient-reply"
        tag = f"[{self.case_ids[case]}] "
        intake = f"intake@{self.domain}"
        clinic = (f"{rng.choice(('dr.kaya', 'dr.demir', 'records'))}@"
                  f"{rng.choice(('clinic-a.example', 'lab.clinic-a.example'))}")
        refs = list(dict.fromkeys([fc.thread[0], *fc.thread[-9:]]))
        none, clinic_prot = Protection("none", "none"), Protection(
            rng.choice(("openpgp", "smime")), "verified", CLINIC_FPR)
        patient = (fc.name, fc.patient)
        if kind == "patient-reply":
            subj = rng.choice(PREFIX["patient"]) + (tag if rng.random() < 0.4 else "") + fc.subject
            args = (patient, [intake], [fc.coord], subj, refs, refs[-1], none, [intake])
        elif kind == "clinic-reply":
            args = (("Clinic A", clinic), [fc.coord], [intake], f"RE: {tag}{fc.subject}", refs,
                    refs[-1], clinic_prot, [fc.coord])
        elif kind == "coord-tagged":
            args = (("Coordinator", fc.coord), [fc.patient], [intake],
                    f"{tag}{rng.choice(SUBJECTS)}", [], None, none, [intake])
        elif kind == "coord-reply":
            args = (("Coordinator", fc.coord), [fc.patient], [intake], f"Re: {fc.subject}", refs,
                    refs[-1], none, [intake])
        else:  # patient-fresh, and the parent of a late-parent pair
            args = (patient, [intake], [], rng.choice(SUBJECTS), [], None, none, [intake])
        planned, msgid = self.build(kind, case, *args)  # type: ignore[arg-type]
        fc.thread.append(msgid)
        if kind != "late-parent":
            return planned
        # the clinic's answer to this new mail arrives first; the parent later, by IMAP
        self.pending.append(planned)
        child, child_id = self.build("late-child", case, ("Clinic A", clinic), [fc.coord],
                                     [intake], f"RE: {tag}{rng.choice(SUBJECTS)}", [msgid],
                                     msgid, clinic_prot, [fc.coord])
        fc.thread.append(child_id)
        return child

    def duplicate(self) -> Planned:
        orig = self.rng.choice(self.recent)
        if self.rng.random() < 0.5:
            return Planned("dup-exact", orig.case, orig.raw, orig.protection,
                           orig.envelope_from, orig.recipients)
        received = (f"Received: from imap.{self.domain} by mailhub; "
                    f"{format_datetime(self.clock)}\r\n").encode()
        return Planned("dup-imap", orig.case, received + orig.raw, orig.protection,
                       orig.envelope_from, orig.recipients)


