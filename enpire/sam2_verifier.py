"""SAM2 as the segmenter of a camera verifier, with a checkpoint the user supplies (sam2 ships no weights).

For Push-T the block is segmented by SAM2 (prompted at the pixels nearest the block's colour) instead of
by colour alone, and the mask is judged like the OpenCV verifier's: a pose fit against the calibrated
goal (`enpire.verify.verify_pusht_frame`). Use it as a task's verifier:

    [tasks.pusht]
    verifier = "vision"
    verifier_kind = "enpire.sam2_verifier:verify"     # ENPIRE_SAM2_CHECKPOINT=/path/to/sam2.1_hiera_small.pt

Missing package or checkpoint: `Sam2Error`, one line saying which. Only the failure paths and the
mask-to-verdict path are tested here (no SAM2 weights on the test machines).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from bus.messages import Verdict
from enpire.verify import _BLOCK, classify_pusht_pixels, verify_pusht_frame

CHECKPOINT_ENV = "ENPIRE_SAM2_CHECKPOINT"
CONFIG_ENV = "ENPIRE_SAM2_CONFIG"
DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_s.yaml"


class Sam2Error(RuntimeError):
    """SAM2 cannot run here: one line naming what is missing."""


class Sam2Segmenter:
    def __init__(self, checkpoint: str | Path, model_cfg: str = DEFAULT_CONFIG, device: str = "cpu"):
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise Sam2Error(f"SAM2 checkpoint {checkpoint}: no such file (sam2 ships no weights: download a "
                            f"checkpoint and give its path in ${CHECKPOINT_ENV})")
        try:
            from sam2.build_sam import build_sam2
            from sam2.sam2_image_predictor import SAM2ImagePredictor
        except ImportError as e:
            raise Sam2Error(f"the SAM2 verifier needs the sam2 package: pip install 'enpire[vision]' ({e})") from None
        try:
            self.predictor = SAM2ImagePredictor(build_sam2(model_cfg, str(checkpoint), device=device))
        except Exception as e:  # noqa: BLE001 - a wrong config or a corrupt checkpoint, in one line
            raise Sam2Error(f"SAM2 checkpoint {checkpoint} with config {model_cfg}: {type(e).__name__}: {e}") from None

    def segment(self, frame: np.ndarray, point: tuple[float, float]) -> np.ndarray:
        """Boolean mask of the object under `point` (x, y in pixels)."""
        self.predictor.set_image(np.asarray(frame, dtype=np.uint8))
        masks, _, _ = self.predictor.predict(point_coords=np.array([point], dtype=np.float32),
                                             point_labels=np.array([1]), multimask_output=False)
        return np.asarray(masks[0]) > 0.5


def verify_pusht_sam2(frame: np.ndarray, segmenter) -> Verdict:
    """Push-T verdict from SAM2's mask of the block (prompted at the middle of the block-coloured pixels)."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        return Verdict(success=False, score=0.0, reason=f"frame shape {frame.shape}, expected HxWx3", verifier="pusht_sam2")
    ys, xs = np.nonzero(classify_pusht_pixels(frame) == _BLOCK)
    if xs.size == 0:
        return Verdict(success=False, score=0.0, reason="no block in view to prompt SAM2", verifier="pusht_sam2")
    # The pixel of the block's colour nearest to their centroid: inside the T even when the centroid is not.
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    mask = segmenter.segment(frame, (float(xs[i]), float(ys[i])))
    return verify_pusht_frame(frame, block_mask=mask, verifier="pusht_sam2")


@functools.cache
def _segmenter(checkpoint: str, config: str) -> Sam2Segmenter:
    return Sam2Segmenter(checkpoint, config)


def verify(state, frame=None, method: str = "vision") -> Verdict:
    """The verifier plugin entry (`verifier_kind = "enpire.sam2_verifier:verify"`)."""
    if frame is None:
        return Verdict(success=False, score=0.0, reason="no frame", verifier="pusht_sam2")
    checkpoint = os.environ.get(CHECKPOINT_ENV, "")
    if not checkpoint:
        raise Sam2Error(f"the SAM2 verifier needs ${CHECKPOINT_ENV}: the path of a SAM2 checkpoint")
    return verify_pusht_sam2(frame, _segmenter(checkpoint, os.environ.get(CONFIG_ENV, DEFAULT_CONFIG)))
