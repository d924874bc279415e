"""The episode store: one compressed .npz per episode under the state dir, indexed on the blackboard.

Files hold plain arrays only (observations (T+1, obs_dim), actions (T, act_dim), rewards (T,)) and are
read back with allow_pickle=False: nothing stored can execute code when loaded.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

FIELDS = ("observations", "actions", "rewards")


class EpisodeFileError(ValueError):
    """An episode file that cannot be read back; the message names the file and what is wrong."""


def write_trajectory(path: Path, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> int:
    """Write atomically (temp file + rename, so a crash never leaves half a file); returns bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, observations=observations, actions=actions, rewards=rewards)
    os.replace(tmp, path)
    return path.stat().st_size


def read_trajectory(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in FIELDS}
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
    return arrays

