"""The episode store: one compressed .npz per episode under the state dir, indexed on the blackboard.

Files hold plain arrays only (observations (T+1, obs_dim), actions (T, act_dim), rewards (T,), and for
pixel observations frames (T+1, H, W, 3) uint8) and are read back with allow_pickle=False: nothing stored
can execute code when loaded. Frames are deflated at level 1: ~30x smaller, several times faster than
numpy's default level, which would cost the daemon more CPU than the rest of an episode's bookkeeping.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

FIELDS = ("observations", "actions", "rewards")
OPTIONAL = ("frames",)


class EpisodeFileError(ValueError):
    """An episode file that cannot be read back; the message names the file and what is wrong."""


def write_trajectory(path: Path, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                     frames: np.ndarray | None = None) -> int:
    """Write atomically (temp file + rename, so a crash never leaves half a file); returns bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {"observations": observations, "actions": actions, "rewards": rewards}
    if frames is not None:
        arrays["frames"] = frames
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:  # the layout np.savez_compressed writes
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=False)
            z.writestr(name + ".npy", buf.getvalue(), compresslevel=1 if name == "frames" else 6)
    os.replace(tmp, path)
    return path.stat().st_size


def read_trajectory(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in FIELDS}
            arrays.update({k: data[k] for k in OPTIONAL if k in data.files})
    except FileNotFoundError:
        raise EpisodeFileError(f"{path}: missing") from None
    except KeyError as e:
        raise EpisodeFileError(f"{path}: no array {e}") from None
    except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        # NotImplementedError: zipfile's answer to corrupted header flags it does not support
        raise EpisodeFileError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    t = len(arrays["actions"])
    if arrays["observations"].shape[:1] != (t + 1,) or arrays["rewards"].shape != (t,):
        raise EpisodeFileError(
            f"{path}: inconsistent lengths: {arrays['observations'].shape[0]} observations, {t} actions, "
            f"{arrays['rewards'].shape[0]} rewards"
        )
    frames = arrays.get("frames")
    if frames is not None and (frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != t + 1):
        raise EpisodeFileError(f"{path}: frames must be ({t + 1}, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    return arrays

