"""Checkpoints: written atomically, validated on load, carrying everything --resume needs
(model, optimizer, AMP scaler, epoch, early-stopping state, history and RNG states).

On disk a checkpoint is an envelope {"format", "sha256", "payload"}: the payload is the
torch.save bytes of the state (a uint8 tensor) and sha256 their digest, checked before the
payload is unpickled. torch's zip reader checks no CRC, so without it flipped bytes inside a
tensor load silently. Both levels load with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from merlin_ncf.models.errors import TrainingError
from merlin_ncf.atomic import atomic_file

FORMAT = "merlin-ncf-checkpoint/1"  # the state inside the envelope
ENVELOPE = "merlin-ncf-checkpoint-envelope/1"


def save_atomic(obj, *paths: Path) -> None:
    """Seal `obj` in a checksummed envelope, serialised once and, for each of `paths`,
    written beside it and renamed over it (best.pt and last.pt of an improving epoch)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getbuffer()
    envelope = {"format": ENVELOPE, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(payload, dtype=torch.uint8)}
    sealed = io.BytesIO()
    torch.save(envelope, sealed)
    for path in paths:
        with atomic_file(path) as tmp:
            tmp.write_bytes(sealed.getbuffer())


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # Stored as tensors and plain ints so that torch.load(weights_only=True) accepts it.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def load(path: str | Path) -> dict:
    """Read and sanity-check a checkpoint, raising TrainingError on anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} not found")
    envelope = _torch_load(path, path)
    if isinstance(envelope, dict) and envelope.get("format") == FORMAT:
        return envelope  # written before checksums: nothing to verify
    if not isinstance(envelope, dict) or envelope.get("format") != ENVELOPE:
        raise TrainingError(f"{path} is not a {FORMAT} checkpoint")
    payload = envelope.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise TrainingError(f"corrupt checkpoint {path}: no payload")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != envelope.get("sha256"):
        raise TrainingError(f"corrupt checkpoint {path}: its sha256 does not match its contents")
    state = _torch_load(io.BytesIO(data), path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a {FORMAT} checkpoint")
    return state


def _torch_load(source, path: Path):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise TrainingError(f"corrupt checkpoint {path}, or not a torch checkpoint ({type(exc).__name__})") from None
