"""The SAM2 verifier adapter: clear failures without sam2 or a checkpoint; its mask-to-verdict path."""

import importlib.util

import numpy as np
import pytest

from enpire.sam2_verifier import Sam2Error, Sam2Segmenter, verify, verify_pusht_sam2
from enpire.verify import PUSHT_GOAL_POSE, _drawn_tee, _pixel_centres
from hw.pusht import PushTDriver


def test_missing_checkpoint_and_package_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(Sam2Error, match=r"checkpoint .*nope\.pt: no such file") as e:
        Sam2Segmenter(tmp_path / "nope.pt")
    assert "\n" not in str(e.value)
    monkeypatch.delenv("ENPIRE_SAM2_CHECKPOINT", raising=False)
    with pytest.raises(Sam2Error, match="needs \\$ENPIRE_SAM2_CHECKPOINT"):
        verify({}, np.zeros((256, 256, 3), np.uint8))
    if importlib.util.find_spec("sam2") is None:
        (tmp_path / "w.pt").write_bytes(b"not weights")
        with pytest.raises(Sam2Error, match=r"needs the sam2 package: pip install 'enpire\[vision\]'"):
            Sam2Segmenter(tmp_path / "w.pt")


class RendererMask:
    """Stands in for SAM2 with the exact silhouette of the drawn block (the geometry path under test)."""

    def __init__(self, pose):
        self.pose, self.prompts = pose, []

    def segment(self, frame, point):
        self.prompts.append(point)
        wx, wy = _pixel_centres(frame.shape[:2], frame.shape[0] / 512.0)
        return _drawn_tee(self.pose, wx, wy)


@pytest.mark.parametrize("pose, success", [(PUSHT_GOAL_POSE, True), ((300.0, 200.0, 0.3), False)])
def test_mask_of_the_block_decides(pose, success):
    d = PushTDriver(frame_size=256)
    d.connect()
    d.reset(0)
    d.set_state(pose, (60.0, 60.0))
    seg = RendererMask(pose)
    verdict = verify_pusht_sam2(d.frame(), seg)
    assert verdict.success is success and verdict.verifier == "pusht_sam2"
    x, y = seg.prompts[0]
    assert seg.segment(d.frame(), None)[int(y), int(x)]  # the prompt lies on the block
