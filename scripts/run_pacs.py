"""The web labelling workflow on one machine: Orthanc (DICOMweb) + the MONAI Label server + OHIF.

    python -m scripts.run_pacs [--upload DICOM_FOLDER ...] [--auth USER:PASSWORD]

1. starts Orthanc on 127.0.0.1 (``--orthanc-port``, default 8043: Debian's own Orthanc service
   keeps 8042) with the DICOMweb plugin and its own storage folder (``--storage``, default
   ``.pacs/``); HTTP basic authentication when ``--auth`` (or ``SARCO_PACS_AUTH``) is given;
2. uploads the demo phantom DICOM series (written to ``demo_dicom/`` when missing: one-slice
   L3 phantoms and an L1-L5 volume phantom) and every
   ``--upload`` folder, repairing empty UIDs (:func:`sarco_app.inputs.pacs.repair_uids`);
3. starts ``monailabel start_server --studies <Orthanc DICOMweb root>`` on ``--host``/``--port``
   with the credentials passed through (``MONAI_LABEL_DICOMWEB_USERNAME``/``_PASSWORD``), and
   prints the OHIF URL. Ctrl-C stops both.

``--no-server`` stops after the upload and keeps Orthanc running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sarco_app.inputs import pacs
from sarco_app.errors import SarcoError

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=ROOT / ".pacs", help="Orthanc storage + server cache")
    parser.add_argument("--orthanc-port", type=int, default=8043)
    parser.add_argument("--host", default="127.0.0.1", help="MONAI Label server address")
    parser.add_argument("--port", type=int, default=8000, help="MONAI Label server port")
    parser.add_argument("--auth", default=os.environ.get("SARCO_PACS_AUTH", ""),
                        help="USER:PASSWORD: turn Orthanc's authentication on (default: off; env SARCO_PACS_AUTH)")
    parser.add_argument("--upload", type=Path, action="append", default=[],
                        help="DICOM folder (or file) to upload as well; repeatable")
    parser.add_argument("--demo", type=Path, default=ROOT / "demo_dicom", help="demo phantom DICOM folder")
    parser.add_argument("--demo-count", type=int, default=4, help="phantoms to write when --demo is missing")
    parser.add_argument("--no-server", action="store_true", help="only Orthanc and the upload")
    return parser.parse_args(argv)


def ensure_demo(folder: Path, count: int) -> Path:
    """One-slice L3 phantoms and one L1-L5 volume phantom (OHIF's MONAI Label mode needs a
    series of several slices to build its volume)."""
    if not any(folder.glob("*/*.dcm")):
        from sarco_app.synthesis.phantom.writing import write_cohort
        from sarco_app.synthesis.phantom3d.build import make_volume_phantom
        from sarco_app.synthesis.phantom3d.writing import write_volume_dicom

        write_cohort(folder, count=count, seed=2024, format="dicom")
        volume, _ = make_volume_phantom(2024, slice_thickness=5.0, matrix=256, coverage="mid")
        write_volume_dicom(volume, folder / "volume_L1_L5", "volume_L1_L5", seed=2024,
                           description="Synthetic abdomen L1-L5")
    return folder


def upload_all(orthanc: pacs.Orthanc, folders: list[Path]) -> None:
    session = orthanc.session()
    for folder in folders:
        result = pacs.upload(orthanc.dicomweb_root, folder, session=session)
        note = f", generated UIDs for {len(result.repaired)}" if result.repaired else ""
        print(f"uploaded {folder}: {result.instances} instance(s) in {len(result.series_uids)} series{note}",
              flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    user, _, password = args.auth.partition(":")
    if args.auth and not (user and password):
        print("error: --auth must be USER:PASSWORD", file=sys.stderr)
        return 2
    orthanc = pacs.Orthanc(args.storage / "orthanc", args.orthanc_port, user or None, password or None)
    server = None
    try:
        orthanc.start()
        print(f"Orthanc: {orthanc.url} (DICOMweb {orthanc.dicomweb_root}; authentication "
              f"{'on' if user else 'off'}; storage {orthanc.storage})", flush=True)
        upload_all(orthanc, [ensure_demo(args.demo, args.demo_count), *args.upload])
        if args.no_server:
            print("Orthanc runs; Ctrl-C stops it.", flush=True)
            while True:
                time.sleep(3600)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str((args.storage / "cache").resolve())
        if user:
            env["MONAI_LABEL_DICOMWEB_USERNAME"], env["MONAI_LABEL_DICOMWEB_PASSWORD"] = user, password
        cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(ROOT / "apps" / "sarcopenia"),
               "--studies", orthanc.dicomweb_root, "--host", args.host, "--port", str(args.port)]
        server = subprocess.Popen(cmd, env=env, cwd=str(ROOT), start_new_session=True)
        print(f"\nOHIF: http://{args.host}:{args.port}/ohif/   (MONAI Label server http://{args.host}:{args.port})\n",
              flush=True)
        return server.wait()
    except SarcoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())
