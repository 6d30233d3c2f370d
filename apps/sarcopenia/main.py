"""MONAI Label app for body-composition labelling at L3 (muscle, SAT, VAT, IMAT).

Thin on purpose: every algorithm lives in the ``sarco_app`` library; the task classes in
``lib/`` only adapt it to MONAI Label. Configuration lives in one place, :class:`AppConfig`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict

# The library sits at the repository root, two levels above this app.
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402

import sarco_app  # noqa: E402
from sarco_app.labels import LABELS  # noqa: E402

# Task modules are imported here, at load time: MONAI Label puts the app folder on sys.path
# only while it executes this file, so `lib` cannot be imported later inside init_infers().
from lib.infers.quantification import QuantificationInfer  # noqa: E402
from lib.infers.bodycomp import BodyCompInfer  # noqa: E402
from lib.infers.scribbles import TissueScribblesInfer  # noqa: E402
from lib.infers.l3_locator import L3LocatorInfer  # noqa: E402
from lib.trainers.bodycomp import BodyCompTrainer  # noqa: E402
from lib.infers.pseudo import PSEUDO_TASK, PseudoBatchInfer, PseudoLabelInfer  # noqa: E402
from lib.activelearning import QueueStrategy, UncertaintyScorer, UncertaintyScoring  # noqa: E402
from lib.loop_routes import loop_router  # noqa: E402
from lib.datastore import HardenedDatastore  # noqa: E402
from lib.guard import install_guard  # noqa: E402
from lib import limits, security  # noqa: E402
from lib.dicomweb import SarcoDICOMWebDatastore  # noqa: E402

logger = logging.getLogger(__name__)


class AppConfig:
    """Everything configurable, from ``--conf key value`` or environment, in one place."""

    def __init__(self, app_dir: str, conf: Dict[str, str]):
        self.app_dir = Path(app_dir)
        self.conf = conf
        # Where retrained checkpoints go (gitignored); the shipped one is the fallback.
        self.model_dir = Path(self.get("model_dir", str(self.app_dir / "model")))
        self.shipped_model = Path(self.get("shipped_model", str(REPO_ROOT / "models" / "bodycomp_unet.pt")))

    def get(self, key: str, default: str) -> str:
        return self.conf.get(key, os.environ.get(f"SARCO_{key.upper()}", default))


class SarcopeniaApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.config = AppConfig(app_dir, conf)
        self.config.model_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="sarcopenia",
            description="Body composition at L3 on CT: skeletal muscle, subcutaneous, visceral and "
            "intermuscular fat; semi-automatic tools and sarcopenia quantification.",
            version=sarco_app.__version__,
            labels=dict(LABELS),
        )

    def init_datastore(self):
        # Checked ids, tags, paths and labels (lib/datastore.py); a DICOMweb URL goes through
        # MONAI Label to _init_dicomweb_datastore below (lib/dicomweb.py).
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        return HardenedDatastore(self.studies, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                 read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def _init_dicomweb_datastore(self):
        """The DICOMweb branch of ``init_datastore`` (``--studies http://.../dicom-web``): MONAI
        Label's client and settings (``MONAI_LABEL_DICOMWEB_USERNAME``/``_PASSWORD`` for a PACS
        with authentication), our datastore writing DICOM SEG with highdicom."""
        from monailabel.config import settings
        from monailabel.datastore.dicom import DICOMwebClientX
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(
                settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
            )
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        return SarcoDICOMWebDatastore(
            client=client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache_path or None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
        )

    def info(self):
        meta = super().info()
        if str(self.studies).startswith(("http://", "https://")):
            # OHIF's MONAI Label panel (the DICOMweb client) needs the app's labels as a list;
            # ordered by value it says the same as the dict (each task still reports its dict).
            meta["labels"] = [name for name, _ in sorted(LABELS.items(), key=lambda item: item[1])]
        return meta

    def _download_dcmqi_tools(self):
        # The stock DICOMweb start-up downloads dcmqi from GitHub (and fails offline); our SEGs
        # are written by highdicom (sarco_app.inputs.dicom_seg), so dcmqi is never needed.
        logger.info("DICOM SEG by highdicom: dcmqi not needed")

    def bodycomp_model_paths(self) -> list:
        """Checkpoints of the body-composition U-Net, preferred first: retrained, shipped."""
        return [self.config.model_dir / "bodycomp_unet.pt", self.config.shipped_model]

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        # --- task registrations (one block per task family) ---
        infers["quantification"] = QuantificationInfer(datastore=self.datastore)
        infers["bodycomp_unet"] = BodyCompInfer("unet", model_paths=self.bodycomp_model_paths)
        infers["bodycomp_threshold"] = BodyCompInfer("threshold")
        infers["backprojection"] = TissueScribblesInfer("backprojection", datastore=self.datastore)
        infers["grabcut"] = TissueScribblesInfer("grabcut", datastore=self.datastore)
        infers["l3_locator"] = L3LocatorInfer()
        infers[PSEUDO_TASK] = PseudoLabelInfer(model_paths=self.bodycomp_model_paths)
        return infers

    def rounds_path(self) -> Path:
        """The pseudo-label loop's round history, written by the trainer."""
        return self.config.model_dir / "rounds.json"

    def init_batch_infer(self) -> Callable:
        return PseudoBatchInfer()

    def init_strategies(self) -> Dict[str, Strategy]:
        scorer = UncertaintyScorer(self.bodycomp_model_paths)
        return {
            "random": QueueStrategy("random", description="Random image without a final label"),
            "first": QueueStrategy("first", description="First image (by id) without a final label"),
            "uncertainty": QueueStrategy("uncertainty", scorer, description="Image without a final label on "
                                         "which the current model is least certain (softmax entropy)"),
            "pseudo_review": QueueStrategy("pseudo_review", description="Image whose pseudo-label has the "
                                           "lowest confidence (correct it and save it as final)"),
        }

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"uncertainty": UncertaintyScoring(UncertaintyScorer(self.bodycomp_model_paths))}

    def on_init_complete(self):
        super().on_init_complete()
        # The round history's routes join MONAI Label's own API (server process only).
        server = sys.modules.get("monailabel.app")
        if server is not None and hasattr(server, "app"):
            server.app.include_router(loop_router(self.rounds_path))
            install_guard(server.app)  # checked ids, tags, params and uploads before the stock routes
            # Bounded inputs, inference off the event loop, CORS and auth (lib/limits.py,
            # lib/security.py); the middleware stack was built at startup, so it is rebuilt.
            limits.install(server.app, self.config.get)
            security.install(server.app, self.config.get)
            server.app.middleware_stack = server.app.build_middleware_stack()

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        # --- trainer registrations ---
        trainers["bodycomp_unet"] = BodyCompTrainer(
            self.config.model_dir / "bodycomp_unet.pt", init_paths=self.bodycomp_model_paths,
            rounds_path=self.rounds_path(),
        )
        return trainers
