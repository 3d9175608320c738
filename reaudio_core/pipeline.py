"""One Re-AudioLDM generation, top to bottom:

    prompt -> text embedding -> retrieve top-k (captions, clips) -> caption states + audio tokens
           -> classifier-free-guided sampling in the decoder's latent space -> decode -> log-mel
           -> vocoder -> 16 kHz waveform

Everything is a registered component built from a resolved configuration
(:func:`reaudio_core.config.compose`); :meth:`ReAudioPipeline.save_pretrained` writes the
configuration plus each component's weights, :meth:`ReAudioPipeline.from_pretrained` reads them.

What ran is what is recorded: ``pipe.cfg`` (saved beside every output) is the configuration as it
was applied. An override is applied or refused, never dropped (:meth:`ReAudioPipeline.from_config`
says how), and the pipeline writes into it

* ``weights``: per weighted slot (and any slot read from a model directory), where its weights were
  read: ``MODEL/<slot>`` (``pkg:`` spelling kept), the path a ``checkpoint`` / ``weights`` /
  ``pretrained`` parameter named, a mapping part -> path when the parts of one component came from
  different places (``experts``: ``{high: PATH, low: MODEL/denoiser/low}``), or null when the
  component was built from its parameters alone (random initialisation, or none to load: griffin-lim);
* ``retriever``: the database's own retriever (name and parameters as saved in it, with the
  search-time parameters this run changed), since the database decides it;
* ``generation.model`` / ``generation.database``: the model directory and database actually used;
* parameters a component took from its weights (e.g. a VAE's stored ``scale_factor``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checks, conditioning, longclip, modes, timings
from .conditioning import feature_key  # noqa: F401  (re-exported: its old home)
from .generate import MAX_PROMPT_CHARS, clean_prompt, latent_shape  # noqa: F401  (MAX_PROMPT_CHARS: re-exported)
from .config import RECORD_KEY, SLOTS, build, compose, load_config, save_config
from .interfaces import SAMPLE_RATE, Conditioning
from .loading import (_asked_weights, _baselines, _load_slot, _ref, _retriever_change, _sources, _sync,  # noqa: F401
                      resolve_path)  # resolve_path re-exported: its old home
from .mel import MEL_FPS
from .pretrained import Pretrained
from .registry import ReaudioError, get_registry

log = logging.getLogger("reaudio")

RETRIEVAL_TYPES = ("none", "audio", "text", "audio+text")
WEIGHTED_SLOTS = ("denoiser", "decoder", "vocoder", "audio_encoder")


@dataclass
class Generation:
    """What one call returns: per prompt the chosen waveform, its mel and the neighbours used."""
    prompts: list[str]
    waveforms: torch.Tensor  #: [P, samples] float32 at ``sample_rate``
    mels: torch.Tensor  #: [P, T, 64] log-mel
    neighbours: list[list[dict]]  #: per prompt, the retrieved items (caption, path, label, score)
    scores: list[list[float]] = field(default_factory=list)  #: per prompt, re-ranking score per candidate
    sample_rate: int = SAMPLE_RATE
    warnings: list[str] = field(default_factory=list)
    mode: dict = field(default_factory=dict)  #: what ran: {mode, input, strength, mask, retrieve_from, windows}


def noise_schedule(cfg: dict) -> dict:
    """The diffusers scheduler arguments shared by training (DDPMScheduler) and the samplers: the
    reference's noise schedule (section 5) and the denoiser's parameterisation (``diffusion.prediction_type``)."""
    d = cfg["diffusion"]
    return dict(num_train_timesteps=d["num_train_timesteps"], beta_start=d["beta_start"],
                beta_end=d["beta_end"], beta_schedule=d["beta_schedule"], prediction_type=prediction_type(cfg))


SAMPLERS = ("ddim", "dpm-solver", "ddim-trailing")


def make_scheduler(cfg: dict, sampler: str):
    """A diffusers sampling scheduler on :func:`noise_schedule`: ``ddim`` (eta from ``generation.eta``),
    ``dpm-solver`` (DPM-Solver++ 2M), or ``ddim-trailing``: deterministic DDIM on the trailing grid (4 steps:
    999, 749, 499, 249, then to alpha 1), the grid a ``reaudio distill`` student is trained on."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    common = noise_schedule(cfg)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if sampler == "dpm-solver":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "ddim-trailing":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    raise ReaudioError(f"unknown sampler '{sampler}'; use one of {', '.join(SAMPLERS)}")


PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(cfg: dict) -> str:
    """``diffusion.prediction_type``: epsilon (the reference) or v_prediction (v = sqrt(a) eps - sqrt(1-a) x0)."""
    kind = cfg["diffusion"].get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ReaudioError(f"diffusion.prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")
    return kind


class ReAudioPipeline:
    model_dir: Path | None = None
    notes: tuple[str, ...] = ()  #: load-time notes (e.g. another encoder than the model's), in every Generation

    def __init__(self, cfg: dict, components: dict, database=None):
        self.cfg = cfg
        self.text_encoder = components["text_encoder"]
        self.caption_encoder = components.get("caption_encoder")
        self.audio_encoder = components.get("audio_encoder")
        self.denoiser = components["denoiser"]
        self.decoder = components["decoder"]
        self.vocoder = components["vocoder"]
        self.reranker = components.get("reranker")
        self.database = database
        gen = cfg["generation"]
        if gen["retrieval"] not in RETRIEVAL_TYPES:
            raise ReaudioError(f"generation.retrieval must be one of {RETRIEVAL_TYPES}, got {gen['retrieval']!r}")
        gen["engine"] = "torch"  # what runs: this class is the torch engine (reaudio_core/lite is the ONNX one)
        self._check_wiring()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict, model_dir: str | Path | None = None, db: str | Path | None = None):
        """Build every slot of ``cfg``; weights from ``model_dir/<slot>`` where present.

        What the caller changed is ``cfg`` against its baseline (the model directory's saved
        ``config.yaml``, else the preset's own configuration). For a slot whose weights are in
        ``model_dir/<slot>``:

        * a weights parameter (``checkpoint`` / ``weights`` / ``pretrained``) is applied: the component is
          built from its parameters with those weights instead (``experts``: ``high.params.checkpoint=X``
          loads that expert from X, the other from ``model_dir/denoiser/low``);
        * any other changed parameter goes to the component's ``from_pretrained(dir, **changes)`` and must
          come back as asked; one it rejects or does not take (a size fixed by the weights) is refused;
        * naming another component there is refused unless its weights are given too.

        A retriever change must be one the database can honour (:meth:`Database.open`), else refused with
        the command that builds a database for it. ``pipe.cfg`` records what ran (module docstring).
        """
        cfg = copy.deepcopy(cfg)
        model_ref = model_dir or cfg["generation"].get("model")
        model_dir = resolve_path(model_ref)
        reg = get_registry()
        if cfg["generation"].get("require_weights") and model_dir is None:
            raise ReaudioError(
                f"preset '{cfg.get('preset')}' needs trained weights, and none were given. Supply a directory "
                "written by save_pretrained / `reaudio train` with --model DIR (it must hold config.yaml and "
                f"{', '.join(f'{s}/' for s in WEIGHTED_SLOTS if cfg.get(s))}), or point the components at real checkpoints "
                "(e.g. denoiser.params.checkpoint=AudioLDM.ckpt or a diffusers folder, decoder.params.checkpoint=..., "
                "vocoder.params.checkpoint=...) and set generation.require_weights=false.")
        bases = _baselines(cfg, model_dir)
        components, record = {}, {}
        for slot in SLOTS:
            entry = cfg.get(slot)
            if entry is None or slot == "retriever":
                continue
            spec = reg.spec(SLOTS[slot], entry["name"])
            weights = model_dir / slot if model_dir else None
            if weights is not None and weights.is_dir() and issubclass(spec.cls, Pretrained):
                components[slot], record[slot] = _load_slot(cfg, slot, weights, _ref(model_ref, model_dir, slot),
                                                            bases[0].get(slot) if bases else None)
            elif (weights is not None and slot in WEIGHTED_SLOTS and issubclass(spec.cls, Pretrained)
                  and not _asked_weights(SLOTS[slot], entry)):
                raise ReaudioError(f"{model_dir} has no {slot}/ weights; expected {weights}/ "
                                   "(written by save_pretrained)")
            else:
                components[slot] = build(cfg, slot)
                record[slot] = _sources(SLOTS[slot], entry["params"])
                _sync(cfg, slot, components[slot], {}, record[slot])
        cfg[RECORD_KEY] = {s: r for s, r in record.items() if s in WEIGHTED_SLOTS or r is not None}
        if model_dir is not None:
            cfg["generation"]["model"] = _ref(model_ref, model_dir)
        database = None
        db_ref = db or cfg["generation"].get("database")
        db = resolve_path(db_ref)
        if cfg["generation"]["retrieval"] != "none":
            if not db:
                raise ReaudioError(f"retrieval '{cfg['generation']['retrieval']}' needs a database: pass --db DIR "
                                   "(built with `reaudio index build`) or set generation.database")
            from .database import Database
            database = Database.open(db, retriever=_retriever_change(cfg, bases))
            cfg["retriever"] = database.retriever_entry
            cfg["generation"]["database"] = _ref(db_ref, db)
        pipe = cls(cfg, components, database)
        pipe.model_dir = model_dir
        pipe.notes = pipe._check_trained_encoders()
        return pipe

    @classmethod
    def from_preset(cls, preset: str, overrides: Sequence[str] = (), files: Sequence[str] = (), **kw):
        return cls.from_config(compose(preset, files, overrides), **kw)

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: Sequence[str] = (), db=None):
        """A saved pipeline (``config.yaml`` + weights), or a diffusers ``AudioLDMPipeline`` folder
        (``model_index.json``; :mod:`reaudio_core.diffusers_folder`). ``overrides`` are applied last."""
        directory = Path(directory)
        from . import diffusers_folder
        if diffusers_folder.is_diffusers_folder(directory):
            return diffusers_folder.load(cls, directory, overrides, db=db)
        if not (directory / "config.yaml").exists():
            raise ReaudioError(f"{directory} is not a saved pipeline: config.yaml missing "
                               "(write one with save_pretrained or `reaudio train`)")
        saved = load_config(directory)
        saved["generation"] = {**(saved.get("generation") or {}), "require_weights": False}
        try:  # the saved configuration alone first, so that its faults name the file (and the user's overrides not)
            lacking = [s for s in ("text_encoder", "denoiser", "decoder", "vocoder")
                       if compose(None, [], [], base=saved).get(s) is None]
            if lacking:
                raise ReaudioError(f"no {', '.join(lacking)} configured")
        except ReaudioError as exc:
            raise ReaudioError(f"{directory / 'config.yaml'} is not a saved pipeline's configuration: {str(exc).rstrip('.')}. Use the "
                               "folder as save_pretrained / `reaudio train` wrote it (OUT/final), or restore "
                               "config.yaml") from None
        cfg = compose(None, [], overrides, base=saved)
        cfg["preset"] = saved.get("preset")
        return cls.from_config(cfg, model_dir=directory, db=db)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for slot in WEIGHTED_SLOTS:
            component = getattr(self, slot)
            if isinstance(component, Pretrained):
                component.save_pretrained(directory / slot)
        save_config({k: v for k, v in self.cfg.items() if k != RECORD_KEY}, directory)  # its weights are here

    def _check_wiring(self) -> None:
        d, gen = self.denoiser, self.cfg["generation"]
        if self.text_encoder.dim != d.prompt_dim:
            raise ReaudioError(f"text_encoder '{self.cfg['text_encoder']['name']}' gives {self.text_encoder.dim}-d "
                               f"prompt embeddings, the denoiser expects {d.prompt_dim}")
        wants_text = gen["retrieval"] in ("text", "audio+text")
        wants_audio = gen["retrieval"] in ("audio", "audio+text")
        if wants_text and d.text_dim is None or wants_audio and d.audio_dim is None:
            raise ReaudioError(f"retrieval '{gen['retrieval']}' needs a denoiser with that stream; this one has "
                               f"text_dim={d.text_dim}, audio_dim={d.audio_dim}")
        if d.text_dim is not None:
            if self.caption_encoder is None:
                raise ReaudioError("the denoiser has a caption stream but no caption_encoder is configured")
            if self.caption_encoder.token_dim != d.text_dim:
                raise ReaudioError(f"caption_encoder gives {self.caption_encoder.token_dim}-d states, "
                                   f"the denoiser expects {d.text_dim}")
        if d.audio_dim is not None:
            if self.audio_encoder is None:
                raise ReaudioError("the denoiser has an audio stream but no audio_encoder is configured")
            if self.audio_encoder.token_dim != d.audio_dim:
                raise ReaudioError(f"audio_encoder gives {self.audio_encoder.token_dim}-d tokens, "
                                   f"the denoiser expects {d.audio_dim}")
        if self.database is not None:
            db_enc = self.database.config.get("text_encoder") or {}
            if db_enc != self.cfg["text_encoder"]:
                raise ReaudioError(
                    f"the database was embedded with text_encoder {db_enc.get('name')!r} {db_enc.get('params')}, "
                    f"this model queries with {self.cfg['text_encoder']['name']!r} {self.cfg['text_encoder']['params']}"
                    ": rebuild the database with the model's text encoder")

    def _check_trained_encoders(self) -> tuple[str, ...]:
        """Warn (and return notes) where this pipeline encodes with another text / caption / audio encoder
        than the model in :attr:`model_dir` was trained with, as its saved ``config.yaml`` records them
        (:func:`reaudio_core.checks.encoder_swaps`). A warning, not an error: a deliberate ablation may do it;
        a dimension mismatch stays an error (:meth:`_check_wiring`)."""
        if self.model_dir is None or not (self.model_dir / "config.yaml").is_file():
            return ()
        loaded = [s for s in WEIGHTED_SLOTS if (self.model_dir / s).is_dir()]
        notes = checks.encoder_swaps(load_config(self.model_dir), self.cfg, f"the model in {self.model_dir}", loaded)
        for note in notes:
            warnings.warn(note, stacklevel=3)
        return tuple(notes)

    # -- conditioning -------------------------------------------------------------------
    def retrieve(self, prompt_emb: torch.Tensor, k: int) -> list[list[dict]]:
        """Top-``k`` database items for each prompt embedding (``[P, d]``), never one whose label is in
        ``generation.exclude_labels``."""
        hidden = set(self.cfg["generation"].get("exclude_labels") or [])
        excl = None
        if hidden:
            ids = [i for i, it in enumerate(self.database.items) if it.get("label") in hidden]
            if not ids:
                raise ReaudioError(f"generation.exclude_labels {sorted(hidden)} matched no database item")
            excl = [ids] * len(prompt_emb)
        scores, ids = self.database.search(prompt_emb.numpy(), k, exclude_ids=excl)
        out = []
        for row_s, row_i in zip(scores, ids):
            out.append([{**self.database.items[i], "id": int(i), "score": float(s)}
                        for s, i in zip(row_s, row_i) if i >= 0])
        return out

    def _caption_states(self, neighbours: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([1, n*L, d], [1, n*L])`` caption states of one prompt's n neighbours: the database's cache, else
        the caption encoder."""
        table = conditioning.cached(self.database, self._feature_key("caption"))
        if table is not None:
            return conditioning.gather(*table, [[n["id"] for n in neighbours]])
        return conditioning.flatten(*conditioning.caption_states(
            self.caption_encoder, [n["caption"] for n in neighbours], self.cfg["generation"]["caption_tokens"]))

    def _audio_tokens(self, neighbours: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([1, n*L, d], [1, n*L])`` audio tokens of one prompt's n neighbours: the database's cache, else
        the audio encoder."""
        table = conditioning.cached(self.database, self._feature_key("audio"))
        if table is not None:
            return conditioning.gather(*table, [[n["id"] for n in neighbours]])
        return conditioning.flatten(*conditioning.audio_tokens(self.audio_encoder, [n["path"] for n in neighbours]))

    def _feature_key(self, stream: str) -> str:
        slot = "caption_encoder" if stream == "caption" else "audio_encoder"
        source = (self.cfg.get(RECORD_KEY) or {}).get(slot)  # where this run read the encoder's weights
        if RECORD_KEY not in self.cfg:  # built directly (not from_config): no record
            source = self.model_dir / slot if self.model_dir else None
        path = resolve_path(source) if isinstance(source, (str, Path)) else None
        files = [] if path is None or not path.exists() else \
            sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
        return feature_key(self.cfg, slot, files or None)

    def cache_features(self, batch_size: int = 16, progress: bool = True,
                       streams: Sequence[str] = ("caption", "audio")) -> list[str]:
        """Precompute neighbour features of every database item into the database, so generation
        does not re-run the caption / audio encoders on neighbours. Returns the feature names written."""
        if self.database is None:
            raise ReaudioError("no database to cache features into")
        written = []
        items = self.database.items
        jobs = [(s, self.caption_encoder if s == "caption" else self.audio_encoder) for s in streams]
        for stream, encoder in jobs:
            if encoder is None:
                continue
            states, masks = [], []
            for i in tqdm(range(0, len(items), batch_size), desc=f"{stream} features", disable=not progress):
                batch = items[i:i + batch_size]
                if stream == "caption":
                    s, m = conditioning.caption_states(encoder, [it["caption"] for it in batch],
                                                       self.cfg["generation"]["caption_tokens"])
                else:
                    s, m = conditioning.audio_tokens(encoder, [it["path"] for it in batch])
                states.append(s.numpy().astype(np.float32))
                masks.append(m.numpy())
            name = self._feature_key(stream)
            self.database.save_features(name, {"states": np.concatenate(states), "mask": np.concatenate(masks)})
            written.append(name)
        return written

    def condition(self, prompts: list[str], k: int, mode: modes.Mode | None = None
                  ) -> tuple[Conditioning, Conditioning, list[list[dict]]]:
        """(conditional, unconditional, neighbours) for a batch of prompts (reference section 3), built by
        :mod:`reaudio_core.conditioning` as training builds them. The neighbours come from the prompt, or from
        ``mode``'s input clip (``mode.retrieve_from``: :mod:`reaudio_core.modes`)."""
        d, retrieval = self.denoiser, self.cfg["generation"]["retrieval"]
        prompt = self.text_encoder.embed(prompts)
        source = mode.retrieve_from if mode is not None else "text"
        neighbours = self.retrieve(prompt, k) if retrieval != "none" and source != "audio" else [[] for _ in prompts]
        if retrieval != "none" and source != "text":
            clip = modes.audio_neighbours(self, mode.wave, k)
            neighbours = [modes.merge(n, clip, k) for n in neighbours]
        empty_prompt, empty_caption = conditioning.empty_text(
            self.text_encoder, self.caption_encoder if d.text_dim is not None else None,
            self.cfg["generation"]["caption_tokens"])
        audio = (self.audio_encoder.num_tokens, d.audio_dim) if d.audio_dim is not None else None
        uncond = conditioning.unconditional(empty_prompt, k, empty_caption, audio, batch=len(prompts))
        captions = tokens = None
        if d.text_dim is not None and retrieval in ("text", "audio+text"):
            parts = [self._caption_states(n) for n in neighbours]
            captions = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if d.audio_dim is not None and retrieval in ("audio", "audio+text"):
            parts = [self._audio_tokens(nb) for nb in neighbours]
            tokens = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        cond = conditioning.assemble(prompt, uncond, captions, tokens)
        if checks.enabled():  # what the denoiser gets: widths, and conditional and unconditional streams agree
            streams = {"prompt": "text_encoder", "captions": "caption_encoder", "audio": "audio_encoder"}
            checks.check_conditioning(cond, uncond, d, {f: f"{s} '{self.cfg[s]['name']}'" for f, s in streams.items()
                                                        if self.cfg.get(s)})
        return cond, uncond, neighbours

    # -- sampling -----------------------------------------------------------------------
    def latent_shape(self, duration: float) -> tuple[int, int, int]:
        dec, den = self.decoder, self.denoiser
        return latent_shape(duration, self.cfg["generation"]["max_duration"], dec.latent_channels, dec.compression,
                            den.downsample, MEL_FPS)

    @torch.inference_mode()
    def sample(self, cond: Conditioning, uncond: Conditioning, shape, generators: list[torch.Generator],
               steps: int, guidance: float, sampler: str, eta: float, progress: bool = True,
               guidance_rescale: float = 0.0, known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
               strength: float = 1.0) -> torch.Tensor:
        """Classifier-free guidance, both halves in one batched denoiser call; a guidance-distilled denoiser
        (:attr:`~reaudio_core.interfaces.Denoiser.guidance_input`) takes the scale and makes one call of the
        conditional batch instead (``guidance_rescale`` does not apply to it). ``guidance_rescale`` (0..1)
        blends the guided prediction with itself rescaled to the conditional prediction's standard deviation
        per sample (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", sec. 3.4;
        diffusers' ``rescale_noise_cfg``): 0 is plain guidance.

        ``known`` (a clean latent), ``strength`` and ``keep`` (1 = keep ``known``): audio-to-audio starts from
        ``known`` noised to ``strength * T``, inpainting keeps ``known`` where ``keep`` is 1 (:mod:`reaudio_core.modes`)."""
        scheduler = make_scheduler(self.cfg, sampler)
        scheduler.set_timesteps(steps)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]) * scheduler.init_noise_sigma
        timesteps, latents = modes.start(scheduler, noise, known, strength, self.cfg["diffusion"]["num_train_timesteps"])
        one_call = bool(getattr(self.denoiser, "guidance_input", False))  # a distilled student guides itself
        guided = guidance != 1.0 and not one_call
        both = uncond.cat(cond) if guided else cond
        if one_call:
            both = dataclasses.replace(cond, guidance=torch.full((len(latents),), float(guidance)))
        extra = {"eta": eta} if sampler == "ddim" else {}
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg["generation"]["precision"] == "bf16"
                    else contextlib.nullcontext())
        for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress, leave=False)):
            latents = modes.blend(scheduler, latents, known, keep, noise, t)
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t)
            with autocast:
                eps = self.denoiser(x, t.expand(len(x)).long(), both).float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
                if guidance_rescale:
                    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
                    eps = rescale_noise_cfg(eps, eps_c, guidance_rescale)
            latents = scheduler.step(eps, t, latents, generator=generators[0] if extra else None, **extra).prev_sample
            if not torch.isfinite(latents).all():
                raise ReaudioError(f"non-finite latents at step {i + 1}/{steps}: lower the guidance scale, "
                                   "use precision=fp32, or check the weights")
        return modes.blend(scheduler, latents, known, keep, noise)

    @torch.inference_mode()
    def __call__(self, prompts: str | Sequence[str], *, seed: int | None = None, steps: int | None = None,
                 guidance: float | None = None, duration: float | None = None, candidates: int | None = None,
                 k: int | None = None, sampler: str | None = None, progress: bool = True, audio=None,
                 strength: float | None = None, mask=None, retrieve_from: str | None = None) -> Generation:
        """Text-to-audio; with ``audio`` (a path or ``(samples, sample_rate)``) audio-to-audio at ``strength``
        (0..1) or inpainting of ``mask`` (``[(start, end), ...]`` seconds or ``"1-2,3-4"``), neighbours from
        ``retrieve_from`` ("text" | "audio" | "both"); a ``duration`` beyond ``generation.max_duration`` is a long
        clip of overlapping windows. ``None`` = ``generation.<key>``. :mod:`reaudio_core.modes`, :mod:`reaudio_core.longclip`."""
        gen = self.cfg["generation"]
        seed = gen["seed"] if seed is None else seed
        steps = gen["steps"] if steps is None else steps
        guidance = gen["guidance"] if guidance is None else guidance
        duration = gen["duration"] if duration is None else duration
        candidates = gen["candidates"] if candidates is None else candidates
        sampler = sampler or gen["sampler"]
        k = gen["k"] if k is None else k
        rescale = float(gen["guidance_rescale"])
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ReaudioError("no prompt given")
        if steps < 1:
            raise ReaudioError(f"steps must be >= 1, got {steps}")
        if candidates < 1:
            raise ReaudioError(f"candidates must be >= 1, got {candidates}")
        if k < 1:
            raise ReaudioError(f"k must be >= 1, got {k}")
        if not 0.0 <= rescale <= 1.0:
            raise ReaudioError(f"generation.guidance_rescale must be in [0, 1], got {rescale}")
        notes: list[str] = []
        cleaned = []
        for p in prompts:
            text, n = clean_prompt(p)
            cleaned.append(text)
            notes += n
        if self.database is not None and k > len(self.database):
            notes.append(f"k={k} is larger than the database ({len(self.database)} items): using k={len(self.database)}")
            k = len(self.database)
        mode = modes.resolve(self, duration, audio, strength, mask, retrieve_from)  # checks; loads and encodes the input
        windows = longclip.plan(self, duration) if duration > gen["max_duration"] else None
        shape = self.latent_shape(windows.window if windows else duration)
        notes += mode.notes + ([windows.note] if windows else [])
        for note in notes:
            warnings.warn(note, stacklevel=2)

        # 1. text (or the input clip) -> retrieve -> encode
        cond, uncond, neighbours = self.condition(cleaned, k, mode)
        timings.mark("condition")
        # 2. sample candidates: candidate c of prompt p uses seed + c (reproducible per candidate);
        #    from the input clip's latent (audio-to-audio, inpainting), or window by window (a long clip)
        generators = [torch.Generator().manual_seed(seed + c) for _ in cleaned for c in range(candidates)]
        args = (cond.repeat_interleave(candidates), uncond.repeat_interleave(candidates), shape, generators, steps,
                guidance, sampler, gen["eta"], progress)
        if windows:
            mels = windows.sample(self, *args, guidance_rescale=rescale)
            timings.mark("denoise")
        else:
            latents = self.sample(*args, guidance_rescale=rescale, known=mode.known, keep=mode.keep,
                                  strength=mode.strength)
            timings.mark("denoise")
            mels = self.decoder.decode(latents)
        timings.mark("decode")
        # 3. vocode
        waves = self.vocoder(mels)
        timings.mark("vocode")
        # 4. keep the best candidate per prompt by audio-text score
        P = len(cleaned)
        waves = waves.reshape(P, candidates, -1)
        mels = mels.reshape(P, candidates, *mels.shape[1:])
        scores = [[0.0] * candidates for _ in range(P)]
        best = [0] * P
        if candidates > 1 and self.reranker is not None:
            text = self.reranker_text(cleaned)
            for p in range(P):
                audio = self.reranker.embed([w.numpy() for w in waves[p]])
                scores[p] = (audio @ text[p]).tolist()
                best[p] = int(np.argmax(scores[p]))
        elif candidates > 1:
            notes.append("no reranker configured: keeping the first candidate of each prompt")
        idx = torch.tensor(best)
        record = {"mode": "long-clip" if windows else mode.name, **mode.record, **(windows.record if windows else {})}
        return Generation(cleaned, waves[torch.arange(P), idx], mels[torch.arange(P), idx], neighbours, scores,
                          self.vocoder.sample_rate, [*self.notes, *notes], record)

    def reranker_text(self, prompts: list[str]) -> torch.Tensor:
        """Text side of the re-ranking joint space: the text encoder of the reranker's name."""
        entry = self.cfg["reranker"]
        if self.cfg["text_encoder"] == entry:
            return self.text_encoder.embed(prompts)
        if not hasattr(self, "_rerank_text"):
            self._rerank_text = get_registry().create("text_encoder", entry["name"], **entry["params"])
        return self._rerank_text.embed(prompts)
