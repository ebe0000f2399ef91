#!/usr/bin/python3
"""A modality's side of DICOM Storage Commitment (Push Model), with pynetdicom.

    commitment_scu.py listen --port P --ae AE --out FILE [--tls KEY CERT CA]
        Runs the modality's Storage Commitment listener: accepts associations that take the
        SCP role for Storage Commitment and answers each N-EVENT-REPORT-RQ with Success,
        appending it as one JSON line to FILE. Runs until killed. With --tls it listens over
        TLS with CERT and KEY and requires a client certificate that chains to CA.

    commitment_scu.py request --port P --ae AE --transaction UID --uids UID... [--same-association S]
                              [--tls KEY CERT CA]
        Sends one N-ACTION-RQ (Request Storage Commitment) to the edge at 127.0.0.1:P
        (called AE BAYLINK) for the CT instances UID..., prints the N-ACTION-RSP status as
        JSON. With --same-association S the association proposes the SCP role for Storage
        Commitment and stays open up to S seconds for the N-EVENT-REPORT, printed as JSON.
        With --tls the association runs over TLS (the edge's DICOM TLS door): the client
        presents CERT with KEY and verifies the edge's certificate against CA, host name
        included (localhost).

Used by tests/src/integration/commitment.rs.
"""

import argparse
import json
import ssl
import sys
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

INSTANCE = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def report_of(event):
    ds = event.event_information
    committed = [i.ReferencedSOPInstanceUID for i in ds.get("ReferencedSOPSequence", [])]
    failed = [
        [i.ReferencedSOPInstanceUID, int(i.FailureReason)]
        for i in ds.get("FailedSOPSequence", [])
    ]
    return {
        "transaction_uid": str(ds.TransactionUID),
        "event_type": int(event.request.EventTypeID),
        "committed": committed,
        "failed": failed,
        "calling_ae": event.assoc.requestor.ae_title.strip(),
    }


def listen(args):
    lock = threading.Lock()

    def on_report(event):
        line = json.dumps(report_of(event))
        with lock, open(args.out, "a") as f:
            f.write(line + "\n")
            f.flush()
        return 0x0000, None

    ae = AE(ae_title=args.ae)
    # The edge proposes to be the SCP of Storage Commitment (it sends the report): accept.
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    ssl_context = None
    if args.tls:
        key, cert, ca = args.tls
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
        ssl_context.verify_mode = ssl.CERT_REQUIRED
        ssl_context.load_cert_chain(certfile=cert, keyfile=key)
    ae.start_server(
        ("127.0.0.1", args.port),
        block=True,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        ssl_context=ssl_context,
    )


def request(args):
    reports = []
    got = threading.Event()

    def on_report(event):
        reports.append(report_of(event))
        got.set()
        return 0x0000, None

    ae = AE(ae_title=args.ae)
    ae.add_requested_context(StorageCommitmentPushModel)
    roles = []
    if args.same_association:
        roles = [build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)]
    tls_args = None
    if args.tls:
        key, cert, ca = args.tls
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.load_cert_chain(certfile=cert, keyfile=key)
        tls_args = (ctx, "localhost")
    assoc = ae.associate(
        "127.0.0.1",
        args.port,
        ae_title="BAYLINK",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        tls_args=tls_args,
    )
    if not assoc.is_established:
        print(json.dumps({"error": "association not established"}))
        return 1
    ds = Dataset()
    ds.TransactionUID = args.transaction
    seq = []
    for uid in args.uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CT
        item.ReferencedSOPInstanceUID = uid
        seq.append(item)
    ds.ReferencedSOPSequence = seq
    status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, INSTANCE)
    out = {"status": int(status.Status) if status else None}
    if args.same_association and out["status"] == 0:
        got.wait(args.same_association)
        out["report"] = reports[0] if reports else None
    assoc.release()
    print(json.dumps(out))
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    l = sub.add_parser("listen")
    l.add_argument("--port", type=int, required=True)
    l.add_argument("--ae", required=True)
    l.add_argument("--out", required=True)
    l.add_argument("--tls", nargs=3, metavar=("KEY", "CERT", "CA"))
    r = sub.add_parser("request")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--ae", required=True)
    r.add_argument("--transaction", required=True)
    r.add_argument("--uids", nargs="+", required=True)
    r.add_argument("--same-association", type=float, default=0)
    r.add_argument("--tls", nargs=3, metavar=("KEY", "CERT", "CA"))
    args = p.parse_args()
    if args.cmd == "listen":
        listen(args)
        return 0
    return request(args)


if __name__ == "__main__":
    sys.exit(main())
