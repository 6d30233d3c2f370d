"""HTTP routes of the pseudo-label loop's round history (added to MONAI Label's FastAPI app).

* ``GET /loop/rounds`` - ``{"rounds": [...]}``, one record per retrain (see
  :func:`sarco_app.segmentation.pseudo.round_record`);
* ``GET /loop/learning_curve.png`` - validation Dice per tissue and labels used by round
  (404 with the reason while no round is recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response


def loop_router(rounds_path: Callable[[], Path]) -> APIRouter:
    router = APIRouter(prefix="/loop", tags=["Pseudo-label loop"])

    @router.get("/rounds", summary="Round history of the pseudo-label retraining loop")
    def rounds():
        from sarco_app.errors import SarcoError
        from sarco_app.segmentation.pseudo import read_rounds

        try:
            return {"rounds": read_rounds(rounds_path())}
        except SarcoError as exc:
            raise HTTPException(status_code=500, detail=str(exc)) from exc

    @router.get("/learning_curve.png", summary="Learning curve of the pseudo-label loop (PNG)")
    def learning_curve():
        from sarco_app.errors import SarcoError
        from sarco_app.segmentation.pseudo import plot_learning_curve, read_rounds

        try:
            history = read_rounds(rounds_path())
            if not history:
                raise HTTPException(status_code=404, detail="no rounds recorded yet: train once to start the history")
            return Response(plot_learning_curve(history), media_type="image/png")
        except SarcoError as exc:
            raise HTTPException(status_code=500, detail=str(exc)) from exc

    return router
