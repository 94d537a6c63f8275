"""Training state on disk: atomic saves and resume with a check of the settings and of the patch
stores trained on (pretrain and finetune share it, so both refuse a resume under changed
settings or rebuilt stores the same way)."""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from dsf import __version__
from dsf.atomic import atomic_path
from dsf.errors import ConfigError, some

log = logging.getLogger(__name__)


def save(obj: Any, path: Path) -> None:
    """torch.save under a temporary name, renamed when complete."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True (never unpickles code); a file that is unreadable, not
    a dict or holds other Python objects is a ConfigError naming it. `mmap`: the tensors are
    mapped, not read (cheap when only the metadata beside them is wanted)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise ConfigError(
            f"refused to load {path}: it is not a file of tensors and plain containers "
            f"({' '.join(detail.split())[:200]}), and loading anything else could run code; "
            "it is not a dsf artifact: give the file the dsf stage wrote, or rerun it"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"cannot load {path}: {type(exc).__name__}: {exc}; it is missing, truncated or not "
            "a dsf artifact: rerun the stage that writes it"
        ) from exc
    if not isinstance(state, dict):
        raise ConfigError(
            f"{path} holds a {type(state).__name__}, not the dict of a dsf artifact: give the "
            "file the dsf stage wrote, or rerun it"
        )
    return state


def file_digest(path: Path) -> str:
    """A digest of a file's bytes (a weights file a fine-tuning started from, `weights_digest`
    of the file as given)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(state: Any) -> str:
    """A digest of every tensor in `state` (nested dicts and lists, keys included): tells
    whether a fine-tuning checkpoint started from these pretrained encoders."""
    h = hashlib.blake2b(digest_size=16)

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{key}/{k}")
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")
        elif isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{obj.dtype}:{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    walk(state, "")
    return h.hexdigest()


def check_stores(path: Path, old: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A ConfigError unless the checkpoint at `path` was trained on the stores `now` describes
    (slide id -> `store_id` of its patch store, `dsf.stores.store_ids`).

    Snakemake reruns a training job after its stores were rebuilt (a tissue or patch setting
    changed, slides came or went); resuming would continue, or with no epoch left simply
    re-export, weights fitted to the old tiles. A checkpoint written before stores had ids
    (`old` None) cannot be checked and passes."""
    if old is None:
        return
    changed = sorted(s for s in set(old) & set(now) if old[s] != now[s])
    added, gone = sorted(set(now) - set(old)), sorted(set(old) - set(now))
    if not (changed or added or gone):
        return
    what = [
        f"{label}: {some(slides, 5)}"
        for label, slides in (("rebuilt since", changed), ("new", added), ("gone", gone))
        if slides
    ]
    # a fine-tuning records "<patch store_id>+<labels store_id>" (dsf.tile_labels)
    labelled = any("+" in str(v) for v in (*old.values(), *now.values()))
    stores, fitted = ("patch or labels", "tiles or labels") if labelled else ("patch", "tiles")
    raise _mismatch(
        f"{path} was trained on other {stores} stores ({'; '.join(what)}), so resuming would "
        f"keep weights fitted to the old {fitted}: delete the checkpoint to train on the "
        "stores as they are now",
        f"other {stores} stores: {'; '.join(what)}",
    )


def _mismatch(message: str, what: str) -> ConfigError:
    """The ConfigError of a checkpoint that does not match the run, `what` differs in short."""
    err = ConfigError(message)
    err.what = what  # type: ignore[attr-defined]
    return err


def finished(state: dict[str, Any]) -> bool:
    """Whether a checkpoint is of a run that trained all its epochs (not one a signal stopped)."""
    epochs = (state.get("settings") or {}).get("epochs")
    return epochs is not None and not state.get("interrupted") and state["epoch"] >= epochs


def load_for_resume(
    path: Path,
    hyper: dict[str, Any],
    stores: dict[str, Any] | None = None,
    encoders: str | None = None,
    restart_finished: bool = False,
) -> dict[str, Any] | None:
    """Load a checkpoint (weights_only) trained on `stores` (`check_stores`) from the pretrained
    `encoders` (a `weights_digest`; neither is checked when None, here or in the checkpoint)
    whose `hyper` must equal `hyper`; else a ConfigError naming the rebuilt stores, the other
    encoders, or every changed setting with its old and new value.

    With `restart_finished` (pretraining, whose checkpoint outlives its run so that more epochs
    can follow), the checkpoint of a finished run is no run to continue under other settings or
    stores but the last one's end: None then (train from the start, replacing it), as
    Snakemake reruns a finished job whose settings or inputs changed. A setting changed in an
    unfinished run stays refused (resuming it would mix two runs).

    Loaded on the CPU: `load_state_dict` moves weights and optimiser moments to the model's
    device, while Adam's step counts stay on the CPU as in a fresh run (on the GPU every step
    would wait on them)."""
    try:
        state = load(path)
    except ConfigError as exc:
        cause = exc.__cause__ or exc
        why = " ".join(f"{type(cause).__name__}: {cause}".split())[:200]
        raise ConfigError(
            f"the training checkpoint {path} cannot be read ({why}): cut short (a job killed "
            "while it was written by an older dsf, a full disk) or damaged; delete it, and the "
            "rerun trains from the start"
        ) from exc
    if not isinstance(state.get("hyper"), dict):
        raise ConfigError(
            f"{path} is not a dsf training checkpoint (no `hyper`): delete it to start over"
        )
    try:
        _check_resume(path, state, hyper, stores, encoders)
    except ConfigError as exc:
        if not (restart_finished and finished(state)):
            raise
        log.warning(
            "%s is of a finished run that cannot be continued (%s): training starts over and "
            "replaces it",
            path,
            getattr(exc, "what", exc),
        )
        return None
    return state


def _check_resume(
    path: Path,
    state: dict[str, Any],
    hyper: dict[str, Any],
    stores: dict[str, Any] | None,
    encoders: str | None,
) -> None:
    """load_for_resume's checks: a ConfigError naming what differs from the checkpoint."""
    if stores is not None:  # first: rebuilt stores also change a computed normalisation
        check_stores(path, state.get("stores"), stores)
    old_encoders = state.get("encoders")
    if encoders is not None and old_encoders is not None and old_encoders != encoders:
        raise _mismatch(
            f"{path} was trained from other starting weights (the pretrained encoders, or the "
            "weights file, have changed since), so resuming would keep weights grown from the "
            "old ones: delete the checkpoint to train from them as they are now",
            "other starting weights",
        )
    old = state["hyper"]
    # what a checkpoint of an older dsf did not record (a setting or check added since) is not
    # compared: it cannot tell, as with stores and encoders; nor what the run no longer reads
    changed = sorted(k for k in old if k in hyper and hyper[k] != old[k])
    if changed:
        detail = (
            f"{', '.join(changed)}: {[old.get(k) for k in changed]} then, "
            f"{[hyper.get(k) for k in changed]} now"
        )
        raise _mismatch(
            f"{path} was trained with other settings ({detail}); restore them, or delete the "
            "checkpoint to start over",
            f"other settings, {detail}",
        )


def save_training(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    **state: Any,
) -> None:
    """A training checkpoint: model, optimiser and scaler states beside `state` (the epoch,
    history, `hyper` and `stores` for `resume_training`'s checks, the settings, ...) and the
    dsf version."""
    full = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        **state,
        "dsf_version": __version__,
    }
    save(full, path)


def resume_training(
    path: Path,
    hyper: dict[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    stores: dict[str, Any] | None = None,
    encoders: str | None = None,
    restart_finished: bool = False,
) -> dict[str, Any] | None:
    """Load a `save_training` checkpoint trained with `hyper` on `stores` from `encoders`
    (`load_for_resume`) into the model, optimiser and scaler; returns the checkpoint for the
    rest of its state, or None (nothing loaded) for a finished run's that starts over."""
    state = load_for_resume(path, hyper, stores, encoders, restart_finished)
    if state is None:
        return None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # empty when saved without fp16 (on the CPU, or with bf16)
        scaler.load_state_dict(state["scaler"])
    return state


def check_epochs(path: Path, done: int, wanted: int, section: str, steps: int = 0) -> None:
    """A checkpoint past `{section}.epochs` cannot be trained back: refuse it (its weights
    would be passed off as a shorter run). One that holds all of them trains nothing more
    (a forced rerun of a finished job): say so, since its results are the old ones. `steps`:
    steps of the next epoch it holds too (a run stopped mid-epoch), past `done` epochs."""
    if steps and done >= wanted:
        raise ConfigError(
            f"{path} holds {done} epochs and {steps} steps of epoch {done + 1}, past "
            f"{section}.epochs {wanted}: its weights are no longer those of {wanted} epochs, "
            f"and a run cannot be trained back. Set {section}.epochs to {done + 1} or more to "
            f"go on, or delete it (`rm {path}`) to train {wanted} epochs from the start"
        )
    if done > wanted:
        raise ConfigError(
            f"{path} holds {done} epochs, more than {section}.epochs {wanted}: a run cannot be "
            f"trained back. Delete it (`rm {path}`) to train {wanted} epochs from the start, or "
            f"set {section}.epochs to {done} or more"
        )
    if done == wanted:
        log.warning(
            "%s holds all %d epochs of %s.epochs: nothing is left to train, so its weights are "
            "exported (a forced rerun gives the old weights again: delete it to train anew)",
            path,
            wanted,
            section,
        )


def nonfinite_weights(
    module: torch.nn.Module, path: Path, section: str, when: str, amp: bool = True
) -> str | None:
    """Why the weights of `module` must not be checkpointed to `path`, or None: a parameter or
    buffer holds a NaN or inf (one device sync). A step whose loss was finite can still spoil
    the weights (a non-finite gradient), and a checkpoint of them would resume a ruined run;
    `when` says where training stood (e.g. "epoch 3"), `amp` whether it ran in mixed
    precision."""
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()]
             if t.is_floating_point()]  # fmt: skip
    if not named:
        return None
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu().tolist()
    bad = [n for (n, _), good in zip(named, ok, strict=True) if not good]
    if not bad:
        return None
    return (
        f"non-finite weights after {when} ({len(bad)} tensors, e.g. {bad[0]}): no checkpoint "
        f"written. {restart_advice(path, section, amp)}"
    )


def restart_advice(path: Path, section: str, amp: bool = True) -> str:
    """What to do after a non-finite loss: the same settings would diverge again, and other
    settings do not resume (`load_for_resume`), so the run starts over without its checkpoint
    (no checkpoint is written after a bad epoch: the last one on disk is good). Turning AMP off
    is advised only to a run in mixed precision (`amp`; never on the CPU)."""
    kept = (
        f" (the last good checkpoint, {path}, is kept: delete it too, since a changed setting "
        "does not resume)"
        if path.exists()
        else ""
    )
    change = f"Lower {section}.lr or turn {section}.amp off" if amp else f"Lower {section}.lr"
    return f"{change} and rerun{kept}; a rerun unchanged would likely diverge again"
