"""The resumable checkpoint format: everything a rerun needs to continue on the same trajectory.

    OUT/checkpoints/step-NNNNNNNN/
      model.safetensors        trainable parameters and the connector (the pretrained parts come from their dirs)
      optimizer.safetensors    optimizer tensors, keyed "<parameter name>::<state name>"; optimizer.json the rest
      scheduler.json           the LR scheduler's state
      rng-rank{R}.safetensors  torch (+cuda) RNG states of each rank; rng-rank{R}.json python and numpy's
      loader-rank{R}.json      each rank's data position (ExampleLoader.state_dict: epoch, batches delivered)
      trainer_state.json       step, rank 0's data position, samples seen, and the settings that wrote it;
                               the MLflow / W&B run ids a resumed run continues (``trackers``)

Tensors go to safetensors and everything else to JSON, so resuming unpickles nothing. A checkpoint is
written into a temporary folder by every rank and renamed by rank 0 (``core.atomic``), so a folder named
``step-N`` is always complete; only the newest ``keep_checkpoints`` are kept. A checkpoint resumes only a
run with the same settings (``resume_key``), except those that change how long or how often, not what
is trained (``TrainConfig.RESUME_EXEMPT``).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from core.atomic import fsync_path
from core.config import TrainConfig
from core.paths import TrainPaths

# torch, numpy and safetensors are imported where they are used: the launcher reads checkpoints' states
# (``latest``, ``read_state``, ``resume_key``) without loading torch.
STATE_KEYS = ("step", "epoch", "batch_in_epoch", "samples_seen")


def resume_key(cfg: TrainConfig, world: int) -> dict:
    exempt = set(TrainConfig.RESUME_EXEMPT)
    if cfg.epochs is not None:  # the steps follow from the epochs (and the data), which the key holds
        exempt.add("max_steps")
    return {"world_size": world, **cfg.model_dump(mode="json", exclude=exempt)}


def latest(paths: TrainPaths) -> Path | None:
    """The newest complete resumable checkpoint, or None."""
    done = sorted(p for p in paths.checkpoints.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def saved_names(model) -> set[str]:
    """What a resumable checkpoint holds: every trainable parameter, and the connector whole."""
    return {
        n for n, p in model.named_parameters() if p.requires_grad or not n.startswith(("encoder.", "llm."))
    }


def flatten_optimizer(osd: dict) -> tuple[dict, dict]:
    """An optimizer state dict keyed by parameter name -> (tensors for safetensors, the rest for JSON)."""
    import torch

    tensors, rest = {}, {}
    for name, state in osd.get("state", {}).items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}::{k}"] = v.detach().cpu().contiguous()
            else:
                rest.setdefault(name, {})[k] = v
    return tensors, {"state": rest, "param_groups": osd.get("param_groups", [])}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, t in tensors.items():
        name, _, k = key.rpartition("::")
        state.setdefault(name, {})[k] = t
    for name, extra in meta["state"].items():
        state.setdefault(name, {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }


def set_rng_state(tensors: dict, meta: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def staging(paths: TrainPaths, step: int) -> Path:
    """The folder every rank writes step ``step``'s checkpoint into before rank 0 renames it."""
    return paths.checkpoints / f".tmp-{paths.step(step).name}"


def write_rank(tmp: Path, rank: int, loader_state: dict) -> None:
    """Each rank's own part: its RNG streams and its data position (ranks may cut their data into
    different numbers of batches)."""
    from safetensors.torch import save_file

    tensors, meta = rng_state()
    save_file(tensors, tmp / f"rng-rank{rank}.safetensors")
    _write_json(tmp / f"rng-rank{rank}.json", meta)
    _write_json(tmp / f"loader-rank{rank}.json", loader_state)


def write_shared(
    tmp: Path, model_state: dict, keep: set[str], optimizer_state: dict, scheduler_state: dict, state: dict
) -> None:
    """Rank 0's part: the trainable weights, the optimizer and scheduler, the trainer state (with settings)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model_state.items() if k in keep}, tmp / "model.safetensors")
    o_tensors, o_meta = flatten_optimizer(optimizer_state)
    save_file(o_tensors, tmp / "optimizer.safetensors")
    _write_json(tmp / "optimizer.json", o_meta)
    _write_json(tmp / "scheduler.json", scheduler_state)
    _write_json(tmp / "trainer_state.json", state)


def publish(tmp: Path, final: Path, keep_checkpoints: int) -> None:
    """Rank 0, once every rank has written: make the checkpoint visible whole, drop the oldest."""
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(final.parent)
    done = sorted(final.parent.glob("step-*"))
    for old in done[:-keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_model(model, ckpt: Path, want_settings: dict) -> dict:
    """Load a checkpoint's weights into ``model``; returns the trainer state (step, data position, ...)."""
    from safetensors.torch import load_file

    state = read_state(ckpt)
    if state["settings"] != want_settings:
        diff = sorted(k for k in want_settings if state["settings"].get(k) != want_settings[k])
        raise RuntimeError(f"checkpoint {ckpt} was written with other settings ({', '.join(diff)})")
    sd = load_file(ckpt / "model.safetensors")
    missing = saved_names(model) - sd.keys()
    if missing:
        raise RuntimeError(f"checkpoint {ckpt}: model.safetensors lacks {sorted(missing)[:5]}")
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"checkpoint {ckpt}: unexpected parameters {result.unexpected_keys[:5]}")
    return {k: state[k] for k in STATE_KEYS}


CONNECTOR = ("query_tokens", "ln_speech.", "qformer.", "proj.")


def init_from(model, ckpt: Path) -> int:
    """Load every weight a checkpoint holds into ``model`` (``train.init_from``); returns how many tensors. The
    checkpoint must hold the whole connector, and nothing this model has no place for or holds in another shape:
    a different ``train.qformer`` or adapter layout is an error that names the first such weights."""
    from safetensors.torch import load_file

    files = sorted(Path(ckpt).glob("model*.safetensors"))
    if not files:
        raise RuntimeError(
            f"train.init_from: {ckpt} holds no model*.safetensors (is it a training's checkpoint?)"
        )
    sd = {k: v for f in files for k, v in load_file(f).items()}
    own = model.state_dict()
    extra = sorted(k for k in sd if k not in own)
    if extra:
        raise RuntimeError(
            f"train.init_from: {ckpt} holds weights this model has no place for: {extra[:4]} (another "
            "train.qformer, ctc_logits or LoRA layout?)"
        )
    shapes = [
        f"{k} {tuple(sd[k].shape)} here {tuple(own[k].shape)}" for k in sd if sd[k].shape != own[k].shape
    ]
    if shapes:
        raise RuntimeError(f"train.init_from: {ckpt} holds weights of other shapes: {shapes[:3]}")
    missing = sorted(k for k in own if k.startswith(CONNECTOR) and k not in sd)
    if missing:
        raise RuntimeError(f"train.init_from: {ckpt} lacks the connector's {missing[:4]}")
    model.load_state_dict(sd, strict=False)
    return len(sd)


def load_optimizer(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return unflatten_optimizer(
        load_file(ckpt / "optimizer.safetensors"), json.loads((ckpt / "optimizer.json").read_text())
    )


def load_scheduler(ckpt: Path) -> dict:
    return json.loads((ckpt / "scheduler.json").read_text())


def load_loader(ckpt: Path, rank: int) -> dict:
    return json.loads((ckpt / f"loader-rank{rank}.json").read_text())


def restore_rng(ckpt: Path, rank: int) -> None:
    from safetensors.torch import load_file

    set_rng_state(
        load_file(ckpt / f"rng-rank{rank}.safetensors"),
        json.loads((ckpt / f"rng-rank{rank}.json").read_text()),
    )


def read_best(paths: TrainPaths) -> dict | None:
    """The validation figures of the best checkpoint kept so far (``train.validation.keep_best``), or None."""
    try:
        return json.loads(paths.best_record.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
