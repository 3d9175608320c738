"""torch.distributed plumbing shared by ``reaudio train`` and ``reaudio index build``.

Both commands run unchanged under ``torchrun --nproc_per_node N``: :func:`init` reads the
``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` variables torchrun sets and joins the process group
(``gloo`` on CPU, ``nccl`` on CUDA). Without them everything here degrades to a single process.

The data-parallel recipe for embedding a corpus too large for one process
(:func:`build_database_distributed`): every rank reads and embeds a contiguous shard of the
manifest rows, the shards are gathered in row order on rank 0, and rank 0 alone writes the
database through :func:`reaudio_core.database.build_database` (``embedded=``: one index over all
vectors, one exact neighbour table), exactly as a single-process build of the same rows would.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .registry import ReaudioError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised_here: bool = False  #: this module created the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ReaudioError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ReaudioError(f"device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ReaudioError("device=cuda requested but torch sees no CUDA device; use device=cpu")
    if requested == "cuda" or requested == "auto" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init(device: str = "auto", timeout_s: float = 1800) -> DistEnv:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; otherwise a single-process env."""
    world = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistEnv(device=dev)
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if "MASTER_ADDR" not in os.environ:
        raise ReaudioError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun --nproc_per_node N")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, initialised_here=True)


def shutdown(env: DistEnv) -> None:
    if env.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous, balanced shard of ``range(n)`` for ``rank`` (shard sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled over the process group)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any = None, src: int = 0) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ranks (returned; the input is not modified)."""
    if not env.distributed:
        return values
    v = values.detach().clone().to(env.device)
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return (v / env.world).cpu()


def map_sharded(env: DistEnv, items: Sequence, fn: Callable[[Sequence], Any]) -> list[Any]:
    """Run ``fn`` on this rank's contiguous shard of ``items``; return every shard's result in order.

    ``fn`` receives a slice of ``items`` (possibly empty) and may return anything picklable.
    The result list has one entry per rank (rank 0's shard first) on every rank.
    """
    part = shard_range(len(items), env.rank, env.world)
    local = fn(items[part.start:part.stop])
    return all_gather_objects(env, local)


def gather_to_main(env: DistEnv, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``None`` elsewhere)."""
    if not env.distributed:
        return [obj]
    out: list[Any] | None = [None] * env.world if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _merge_embedded(shards: list[tuple]) -> tuple:
    """Concatenate per-shard ``(items, text, audio, skipped)`` in shard order; an item that repeats
    one of an earlier shard (same audio path and caption) is dropped and reported, as a
    single-process build does."""
    import numpy as np
    items, texts, audios, skipped, seen = [], [], [], [], set()
    for s_items, s_text, s_audio, s_skipped in shards:
        skipped += s_skipped
        keep = []
        for i, it in enumerate(s_items):
            key = (it["path"], it["caption"])
            if key in seen:
                skipped.append({"manifest": it.get("manifest"), "line": 0, "path": it.get("file", it["path"]),
                                "caption": it["caption"], "reason": "duplicate of an earlier row (same audio and caption)"})
                continue
            seen.add(key)
            keep.append(i)
            items.append(it)
        texts.append(np.asarray(s_text)[keep])
        if s_audio is not None:
            audios.append(np.asarray(s_audio)[keep])
    text = np.concatenate(texts) if texts else None
    audio = np.concatenate(audios) if audios else None
    return items, text, audio, skipped


def build_database_distributed(manifests, out, cfg: dict, progress: bool = True):
    """``reaudio index build`` on ``WORLD_SIZE`` processes (torchrun): shard, embed, gather, rank 0 writes.

    1. rank 0 checks the settings, the manifests and ``out`` and tells every rank whether to go on;
    2. each rank reads the same manifest rows and embeds its contiguous shard of them
       (:func:`reaudio_core.database._embed_rows`: audio checks, text and audio embeddings);
    3. the shards are gathered on rank 0 in row order, so the result equals a single-process build;
    4. rank 0 writes the database with :func:`reaudio_core.database.build_database` (one index over
       all vectors, exact neighbour table, atomic version switch).

    Returns the build report on rank 0 and ``None`` on the other ranks. Object collectives run
    over gloo (CPU) whatever device the encoders use.
    """
    from pathlib import Path

    from . import database as dbmod
    from .config import compose
    env = init("cpu")
    try:
        if isinstance(manifests, (str, Path)):
            manifests = [manifests]
        preset = cfg.get("preset")
        problem = None
        if env.is_main:
            try:
                full = compose(None, base={k: v for k, v in cfg.items() if k != "preset"})
                dbmod._check_settings(full)
                if full.get("text_encoder") is None or full.get("retriever") is None:
                    raise ReaudioError("a database needs a text_encoder and a retriever")
                for m in manifests:
                    dbmod.read_manifest(m)
                dbmod._check_out_dir(Path(out))
            except ReaudioError as exc:
                problem = str(exc)
        problem = broadcast_object(env, problem)
        if problem:
            raise ReaudioError(problem)
        full = compose(None, base={k: v for k, v in cfg.items() if k != "preset"})
        full["preset"] = preset
        rows = [r for m in manifests for r in dbmod.read_manifest(m)[0]]
        part = shard_range(len(rows), env.rank, env.world)
        text_enc = dbmod._component("text_encoder", full["text_encoder"])
        audio_enc = dbmod._component("audio_encoder", dbmod.audio_encoder_entry(full))
        local = dbmod._embed_rows(rows[part.start:part.stop], full, text_enc, audio_enc, {},
                                  progress and env.is_main, f"embedding (rank {env.rank + 1}/{env.world})")
        shards = gather_to_main(env, local)
        report = None
        if env.is_main:
            merged = _merge_embedded(shards)
            if merged[1] is None:
                import numpy as np
                merged = (merged[0], np.zeros((0, text_enc.dim), np.float32), merged[2], merged[3])
            report = dbmod.build_database(manifests, out, cfg, progress=progress, embedded=merged)
        barrier(env)
        return report
    finally:
        shutdown(env)
