"""The ldm stage: retrieval-conditioned denoiser training on the items of a database, with the
conditions' features cached in the database."""
from __future__ import annotations

import logging

import json
from pathlib import Path

import numpy as np
import torch

from .. import conditioning, distributed
from ..config import build
from ..interfaces import Conditioning
from ..registry import ReaudioError
from .components import component_fingerprint, feature_info, load_or_build, move_component
from .data import Clip, crop_waveform, waveform_to_mel
from .objectives import LdmObjective, timestep_range
from .stages import Stage

log = logging.getLogger("reaudio")


def text_feature_key(cfg: dict) -> str:
    """Database feature name for the prompt embeddings of every item and the unconditional text inputs
    (empty prompt, empty caption states) under this config's text and caption encoders."""
    import hashlib
    entries = [cfg.get("text_encoder"), cfg.get("caption_encoder"), cfg["generation"]["caption_tokens"]]
    h = hashlib.sha1(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"text_conditions-{cfg['text_encoder']['name']}-{h}"


class UnloadedTextEncoder:
    """Stands in for a text encoder that could not be built on this machine (say its weights are not
    installed on a GPU box) while the training database already caches everything the ldm stage needs
    from it (:func:`text_feature_key`, caption states). Its dims are known; running it raises."""

    def __init__(self, entry_name: str, dim: int, token_dim: int | None, why: str):
        self.entry_name, self.dim, self.token_dim, self.why = entry_name, dim, token_dim, why

    def embed(self, texts):
        raise ReaudioError(f"text encoder {self.entry_name!r} is not available here: {self.why}")

    encode_tokens = embed


class LdmStage(Stage):
    """Retrieval-conditioned denoiser training on the items of a database.

    Conditions per training item (the item itself is never its own neighbour): the prompt is the
    text encoder's embedding of its caption; the first ``generation.k`` columns of the database's
    neighbour table (or, with ``training.neighbour_pool`` > k, k of its first neighbour_pool columns drawn
    afresh each step) give the retrieved captions (caption encoder states, ``generation.caption_tokens``
    each) and clips (audio encoder tokens). Neighbour features are computed once and cached in the
    database (``Database.save_features``) under :func:`reaudio_core.conditioning.feature_key`, where
    generation reads them too; conditional and unconditional inputs are built by
    :mod:`reaudio_core.conditioning`, as generation builds them.
    """

    name = "ldm"
    export_slots = ("decoder", "vocoder", "denoiser")  # audio_encoder keeps its entry: the feature-cache key

    def __init__(self, cfg, env, progress):
        super().__init__(cfg, env, progress)
        self._fingerprints: dict[int, str] = {}  # id(encoder) -> component_fingerprint, see _fingerprint
        from ..pipeline import RETRIEVAL_TYPES
        gen = cfg["generation"]
        if gen["retrieval"] not in RETRIEVAL_TYPES:
            raise ReaudioError(f"generation.retrieval must be one of {RETRIEVAL_TYPES}, got {gen['retrieval']!r}")
        for slot in ("text_encoder", "denoiser", "decoder", "vocoder"):
            if cfg.get(slot) is None:
                raise ReaudioError(f"the ldm stage needs the {slot} slot configured")
        if not self.t.get("database"):
            raise ReaudioError("the ldm stage needs training.database (a directory built with `reaudio index build`)")
        from ..database import Database
        self.db = Database.open(self.t["database"])
        self.k = int(gen["k"])
        if self.k < 1:
            raise ReaudioError(f"generation.k must be >= 1, got {self.k}")
        self.build_components(cfg)
        self._check_wiring()
        # data ------------------------------------------------------------------------------
        excluded = set(self.t.get("exclude_labels") or [])
        items = self.db.items
        include = self.t.get("include_ids")
        if include is not None:  # a training subset (e.g. a long-tailed one); the rest stays retrievable
            bad = [i for i in include if not isinstance(i, int) or not 0 <= i < len(items)]
            if bad:
                raise ReaudioError(f"training.include_ids: {bad[:5]} are not item ids of {self.t['database']} "
                                   f"(0..{len(items) - 1})")
            include = set(include)
        root = self.t.get("audio_root")  # relative item paths are read from here (the shipped database's are)
        clips = [Clip(str(Path(root) / it["path"]) if root else it["path"], it.get("caption") or "",
                      it.get("label") or None, i)
                 for i, it in enumerate(items) if (it.get("label") or None) not in excluded
                 and (include is None or i in include)]
        if excluded and len(clips) == len(items):
            log.warning(f"training.exclude_labels {sorted(excluded)} matched no database item")
        self.dataset = self.make_dataset(clips, multiple=self.decoder.compression * self.denoiser.downsample)
        self.dataset.want_mel = not self.t["cache_latents"]
        for component in (self.decoder, self.audio_encoder):  # the caches below are computed on the training device
            move_component(component, env.device)
        self.features()
        from diffusers import DDPMScheduler

        from ..pipeline import noise_schedule  # the samplers' schedule too
        self.scheduler = DDPMScheduler(**noise_schedule(cfg))
        self.objective = self.make_objective()
        if self.t["cache_latents"]:
            self.cache_latents()

    def build_components(self, cfg) -> None:
        """The denoiser to train and the frozen components around it, each from its config entry."""
        self.denoiser = load_or_build(cfg, "denoiser")
        try:
            self.text_encoder = build(cfg, "text_encoder")
        except ReaudioError as exc:  # e.g. its weights are not installed on this (GPU) machine
            self.text_encoder = self._text_encoder_from_cache(exc)
        self.decoder = load_or_build(cfg, "decoder")
        if "checkpoint" in cfg["decoder"]["params"] and not cfg["decoder"]["params"]["checkpoint"]:
            raise ReaudioError("the ldm stage needs a trained VAE: set decoder.params.checkpoint=DIR "
                               "(OUT/final/decoder of `reaudio train` with training.stage=vae)")
        self.vocoder = load_or_build(cfg, "vocoder")
        d = self.denoiser
        self.caption_encoder = None
        if d.text_dim:  # often the prompt encoder itself (offline: MiniLM for both): build it once
            self.caption_encoder = (self.text_encoder if cfg.get("caption_encoder") == cfg["text_encoder"]
                                    else load_or_build(cfg, "caption_encoder"))
        self.audio_encoder = load_or_build(cfg, "audio_encoder") if d.audio_dim else None

    def make_objective(self) -> torch.nn.Module:
        return LdmObjective(self.denoiser, self.scheduler, self.uncond, float(self.t["cfg_drop_all"]),
                            float(self.t["cfg_drop_prompt"]),
                            timestep_range(self.t.get("timesteps"), self.scheduler.config.num_train_timesteps))

    def _check_wiring(self) -> None:
        d, te = self.denoiser, self.text_encoder
        if te.dim != d.prompt_dim:
            raise ReaudioError(f"text_encoder gives {te.dim}-d embeddings, the denoiser expects {d.prompt_dim}")
        if d.text_dim and self.caption_encoder is None:
            raise ReaudioError("the denoiser has a caption stream but no caption_encoder is configured")
        if d.text_dim and self.caption_encoder.token_dim != d.text_dim:
            raise ReaudioError(f"caption_encoder gives {self.caption_encoder.token_dim}-d states, "
                               f"the denoiser expects {d.text_dim}")
        if d.audio_dim and self.audio_encoder is None:
            raise ReaudioError("the denoiser has an audio stream but no audio_encoder is configured")
        if d.audio_dim and self.audio_encoder.token_dim != d.audio_dim:
            raise ReaudioError(f"audio_encoder gives {self.audio_encoder.token_dim}-d tokens, "
                               f"the denoiser expects {d.audio_dim}")
        retrieval = self.cfg["generation"]["retrieval"]
        if retrieval in ("text", "audio+text") and not d.text_dim or retrieval in ("audio", "audio+text") and not d.audio_dim:
            raise ReaudioError(f"generation.retrieval={retrieval} needs a denoiser with that stream "
                               f"(text_dim={d.text_dim}, audio_dim={d.audio_dim})")
        db_enc = self.db.config.get("text_encoder") or {}
        if db_enc and db_enc != self.cfg["text_encoder"]:
            raise ReaudioError(f"the database was embedded with text_encoder {db_enc.get('name')!r}, the training "
                               f"config uses {self.cfg['text_encoder']['name']!r}: rebuild the database or align them")

    # features (computed once, cached) --------------------------------------------------------
    def features(self) -> None:
        gen, d = self.cfg["generation"], self.denoiser
        retrieval, k, n_tok = gen["retrieval"], self.k, gen["caption_tokens"]
        clips = self.dataset.clips
        # prompt embeddings of every database item (cached in the database, like the neighbour features)
        def embed(part):
            e = self.text_encoder.embed([it.get("caption") or "" for it in part]).float()
            return e[:, None], torch.ones(len(part), 1, dtype=torch.bool)

        def empties():  # the unconditional inputs' text parts
            prompt, caption = conditioning.empty_text(self.text_encoder, self.caption_encoder if d.text_dim else None,
                                                      n_tok)
            out = {"empty_prompt": prompt.tolist()}
            if caption is not None:
                out["empty_caption"] = caption.tolist()  # [n_tok, token_dim]
            return out

        prompts, _, info = self.cached_features(text_feature_key(self.cfg), embed, "prompt embeddings",
                                                self.text_encoder, extra=empties)
        rows = np.array([c.index for c in clips])
        self.prompts = prompts[torch.from_numpy(rows), 0]
        # neighbour ids of the training items: [N, k], -1 = no neighbour
        table = np.asarray(self.db.neighbours.ids)
        if table.ndim != 2:
            raise ReaudioError(f"database {self.t['database']} has no neighbour table")
        ids = np.full((len(clips), k), -1, dtype=np.int64)
        width = min(k, table.shape[1])
        ids[:, :width] = table[rows, :width]
        if k > table.shape[1]:
            log.warning(f"generation.k={k} exceeds the neighbour table width {table.shape[1]}: "
                  "the extra slots get unconditional inputs")
        self.neighbour_ids = torch.from_numpy(ids)
        # training.neighbour_pool > k: the k neighbours of each item are drawn per step from a wider pool,
        # so items whose captions tie (one caption per class) do not all share the same k neighbours
        pool = self.t.get("neighbour_pool") or 0
        if not isinstance(pool, int) or pool < 0:
            raise ReaudioError(f"training.neighbour_pool must be an integer >= 0, got {pool!r}")
        self.neighbour_pool = None
        if pool > k:
            if pool > table.shape[1]:
                raise ReaudioError(f"training.neighbour_pool={pool} exceeds the neighbour table width "
                                   f"{table.shape[1]} of {self.t['database']} (database.neighbours)")
            self.neighbour_pool = torch.from_numpy(table[rows, :pool].astype(np.int64))
        # unconditional inputs (a batch of one)
        self.empty_caption = torch.tensor(info["empty_caption"], dtype=torch.float32) if d.text_dim else None
        self.uncond = conditioning.unconditional(
            torch.tensor(info["empty_prompt"], dtype=torch.float32), k, self.empty_caption,
            (self.audio_encoder.num_tokens, d.audio_dim) if d.audio_dim else None)
        # per-database-item neighbour features
        self.caption_feats = self.audio_feats = None
        if d.text_dim and retrieval in ("text", "audio+text"):
            self.caption_feats = self.cached_features(
                conditioning.feature_key(self.cfg, "caption_encoder"),
                lambda part: conditioning.caption_states(self.caption_encoder,
                                                         [it.get("caption") or "" for it in part], n_tok),
                "caption states", self.caption_encoder)[:2]
        if d.audio_dim and retrieval in ("audio", "audio+text"):
            self.audio_feats = self.cached_features(  # an unreadable neighbour clip: an unconditional slot
                conditioning.feature_key(self.cfg, "audio_encoder"),
                lambda part: conditioning.audio_tokens(self.audio_encoder, [it["path"] for it in part],
                                                       unreadable_empty=True),
                "audio tokens", self.audio_encoder)[:2]

    def cached_features(self, key: str, compute, what: str, encoder, extra=None):
        """``(states [N_db, L, d], mask [N_db, L], info)`` for every database item, from the database's
        feature cache or computed (sharded over ranks) and saved into it by rank 0; ``extra()`` gives
        more values for the cache's ``info`` (computed with it).

        The cache records a fingerprint of the encoder's weights; a cache written by other weights
        under the same configuration (e.g. a retrained VAE at the same path) is recomputed, never reused.
        An encoder whose weights are not installed here (:class:`UnloadedTextEncoder`) uses the cache as
        it is: nothing here could recompute or check it.
        """
        unloaded = isinstance(encoder, UnloadedTextEncoder)
        cached = self.db.features(key)
        info = feature_info(self.db, key)
        if cached is not None and unloaded:
            if self.env.is_main:
                log.warning(f"{encoder.entry_name} weights are not installed here ({encoder.why}); using the "
                      f"{what} cached in the database as feature '{key}' (computed with fingerprint "
                      f"{str(info.get('fingerprint'))[:12]})")
        elif cached is not None and info.get("fingerprint") != self._fingerprint(encoder):
            if self.env.is_main:
                log.warning(f"cached feature '{key}' was computed with other weights: recomputing it")
            cached = None
        if cached is None:
            if unloaded:
                raise ReaudioError(f"{encoder.why}; the database {self.t['database']} holds no cached {what} "
                                   f"(feature '{key}') to train without it")
            fp = self._fingerprint(encoder)
            items = list(self.db.items)
            if self.env.is_main:
                log.info(f"caching {what} of {len(items)} database items as feature '{key}'")

            def run(part):
                if not len(part):
                    return None
                out_s, out_m = [], []
                for i in range(0, len(part), 32):
                    s, m = compute(part[i:i + 32])
                    out_s.append(s.float().numpy())
                    out_m.append(m.numpy().astype(bool))
                return np.concatenate(out_s), np.concatenate(out_m)

            shards = [s for s in distributed.map_sharded(self.env, items, run) if s is not None]
            states = np.concatenate([s[0] for s in shards])
            mask = np.concatenate([s[1] for s in shards])
            info = {"what": what, "fingerprint": fp, **(extra() if extra else {})}
            if self.env.is_main:
                self.db.save_features(key, {"states": states, "mask": mask}, info=info)
            distributed.barrier(self.env)
            return torch.from_numpy(states), torch.from_numpy(mask), info
        return (torch.from_numpy(np.array(cached["states"], dtype=np.float32)),
                torch.from_numpy(np.array(cached["mask"], dtype=bool)), info)

    def _fingerprint(self, encoder) -> str:
        """:func:`component_fingerprint`, once per encoder object (the text encoder often serves two caches)."""
        if id(encoder) not in self._fingerprints:
            self._fingerprints[id(encoder)] = component_fingerprint(encoder)
        return self._fingerprints[id(encoder)]

    def _text_encoder_from_cache(self, exc: ReaudioError) -> "UnloadedTextEncoder":
        """A stand-in for a text encoder that cannot be built here, when the database caches every text
        feature this stage needs from it (prompt embeddings, and caption states where the caption
        encoder is the same entry); otherwise ``exc`` is raised."""
        key = text_feature_key(self.cfg)
        cached = self.db.features(key)
        if cached is None:
            raise exc
        d = self.denoiser
        if d.text_dim and self.cfg.get("caption_encoder") != self.cfg["text_encoder"]:
            raise exc
        info = feature_info(self.db, key)
        token_dim = len(info["empty_caption"][0]) if info.get("empty_caption") else None
        return UnloadedTextEncoder(self.cfg["text_encoder"]["name"], int(cached["states"].shape[-1]), token_dim,
                                   str(exc))

    def cache_latents(self) -> None:
        """Encode every training clip's first crop once (posterior mean): no VAE encoder per step.
        The ranks encode a shard each and share the results."""
        from tqdm.auto import tqdm
        ds = self.dataset

        def encode(positions):
            out = []
            with torch.no_grad():
                for pos in tqdm(positions, desc="encoding latents", leave=False,
                                disable=not (self.progress and self.env.is_main)):
                    wav = crop_waveform(ds.waveform(pos)[:ds.samples], ds.samples, np.random.default_rng(0))
                    mel = waveform_to_mel(torch.from_numpy(wav)[None])
                    out.append(self.decoder.encode(mel.to(self.env.device), sample=False).float().cpu())
            return torch.cat(out) if out else None

        shards = distributed.map_sharded(self.env, list(range(len(ds))), encode)
        self.latents = torch.cat([s for s in shards if s is not None])

    # per batch ---------------------------------------------------------------------------------
    def draw_neighbours(self, pos: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` neighbour ids drawn without replacement from each item's pool (``training.neighbour_pool``
        first columns of its table), kept in table order (best first); empty slots (-1) only when the pool
        holds fewer than k. Uses the global torch RNG, which the training loop seeds per step (resumable)."""
        pool = self.neighbour_pool[pos]  # [B, P]
        keys = torch.rand(pool.shape)
        keys[pool < 0] = -1.0  # real neighbours first
        chosen = keys.topk(self.k, dim=1).indices.sort(dim=1).values
        return pool.gather(1, chosen)

    def condition(self, pos: torch.Tensor) -> Conditioning:
        """Training-item positions -> conditional inputs (before guidance dropout); a missing neighbour
        (id -1) is an unconditional slot."""
        nb = self.neighbour_ids[pos] if self.neighbour_pool is None else self.draw_neighbours(pos)  # [B, k]
        captions = None if self.caption_feats is None else conditioning.gather(*self.caption_feats, nb,
                                                                               self.empty_caption)
        audio = None if self.audio_feats is None else conditioning.gather(*self.audio_feats, nb)
        return conditioning.assemble(self.prompts[pos], self.uncond, captions, audio)

    def prepare(self, batch: dict, device: torch.device) -> dict:
        pos = batch["pos"]
        if self.t["cache_latents"]:
            latents = self.latents[pos]
        else:
            with torch.no_grad():
                latents = self.decoder.encode(batch["mel"], sample=bool(self.t["latent_sample"])).float()
        cond = self.condition(pos)
        cond = Conditioning(*(None if v is None else v.to(device) for v in
                              (cond.prompt, cond.captions, cond.caption_mask, cond.audio, cond.audio_mask)))
        return {"latents": latents.to(device), "cond": cond}

    def export_cfg(self) -> dict:
        cfg = super().export_cfg()
        if not cfg["generation"].get("database"):
            cfg["generation"]["database"] = str(self.t["database"])
        return cfg

    def export(self, final: Path) -> None:
        from ..pipeline import ReAudioPipeline
        cfg = self.export_cfg()
        components = {"text_encoder": self.text_encoder, "caption_encoder": self.caption_encoder,
                      "audio_encoder": self.audio_encoder, "denoiser": self.denoiser, "decoder": self.decoder,
                      "vocoder": self.vocoder}
        ReAudioPipeline(cfg, components).save_pretrained(final)
