"""diffusers ``AudioLDMPipeline`` folders, in and out.

In (:func:`load`, reached through ``ReAudioPipeline.from_pretrained(DIR)`` / ``reaudio generate --model DIR``
when ``DIR/model_index.json`` exists): the folder runs as the ``audioldm-s`` preset variant (no retrieval)
with every weight from the folder:

* ``text_encoder`` slot: ``clap`` on ``DIR/text_encoder`` (a ``ClapTextModelWithProjection``) with the
  tokenizer ``DIR/tokenizer``, ``max_length`` = the tokenizer's ``model_max_length`` (diffusers pads and
  truncates to it). A configured reranker scores candidates against this text encoder's embeddings (the
  folder's CLAP text side); no reranker is configured by default, since the folder has no CLAP audio tower.
* ``denoiser`` / ``decoder`` / ``vocoder``: ``unet-ldm`` / ``vae`` / ``hifigan`` with ``checkpoint`` =
  ``DIR/unet`` / ``DIR/vae`` / ``DIR/vocoder``. The UNet follows ``unet-ldm``'s head convention
  (``num_heads: null``, the original AudioLDM code's) unless ``denoiser.params.num_heads`` says otherwise
  (docs/checkpoints.md). A folder whose UNet, VAE or vocoder configuration differs from what the plugins
  build in anything but the head counts is refused, naming the keys.
* ``diffusion``: ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``prediction_type``
  from ``DIR/scheduler/scheduler_config.json``; ``generation.sampler`` from its class where it is one of
  ours (``DDIMScheduler`` -> ``ddim``, ``DPMSolverMultistepScheduler`` -> ``dpm-solver``). Scheduler settings
  our samplers fix otherwise (e.g. DDIM ``steps_offset``) are reported as warnings, not followed.
* ``generation.duration``: diffusers' default length, UNet ``sample_size`` x the VAE's downsampling x 10 ms
  (5.12 s for the published AudioLDM folders); steps, guidance, seed and eta stay reaudio's.

User overrides (``key=value``) are applied last, so they win over all of the above. The resolved
configuration names the folder paths as the components' checkpoints and the architecture that was built.

Out (:func:`export`, ``reaudio export --format diffusers --model DIR OUT``): a saved reaudio pipeline whose
denoiser has no retrieval streams, with a ``clap`` text encoder, ``vae`` decoder and ``hifigan`` vocoder,
written as an ``AudioLDMPipeline`` folder by diffusers' own ``save_pretrained``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

from .config import compose, load_config
from .registry import ReaudioError

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "AudioLDMPipeline"
FOLDERS = ("unet", "vae", "vocoder", "text_encoder", "tokenizer", "scheduler")
VARIANT = "audioldm-s"  #: the registry preset a folder runs as (retrieval none)
#: diffusers scheduler class -> reaudio sampler (pipeline.make_scheduler)
SAMPLERS = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm-solver"}
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
#: weighted slot -> (folder, component name the folder is loaded by)
WEIGHTS = {"denoiser": ("unet", "unet-ldm"), "decoder": ("vae", "vae"), "vocoder": ("vocoder", "hifigan")}
#: configuration keys that do not change what AudioLDMPipeline computes in fp32 (bookkeeping, initialisation,
#: fp16 upcasting, latent statistics its decode_latents does not apply)
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "architectures",
                 "transformers_version", "torch_dtype", "dtype", "sample_size", "initializer_range", "force_upcast",
                 "latents_mean", "latents_std", "shift_factor"}
_HEAD_KEYS = {"attention_head_dim", "num_attention_heads"}


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReaudioError(f"cannot read {path}: {exc}") from None


def read_model_index(root: Path) -> dict:
    """``model_index.json`` of an ``AudioLDMPipeline`` folder with all six component folders, else a ReaudioError."""
    index = _read_json(root / MODEL_INDEX)
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        raise ReaudioError(f"{root} is a diffusers {name} folder; reaudio reads {PIPELINE_CLASS} folders only "
                           "(text_encoder ClapTextModelWithProjection, unet UNet2DConditionModel, vae AutoencoderKL, "
                           "vocoder SpeechT5HifiGan)")
    missing = [f for f in FOLDERS if not (root / f).is_dir()]
    if missing:
        raise ReaudioError(f"{root}: an {PIPELINE_CLASS} folder needs {', '.join(f + '/' for f in FOLDERS)}; "
                           f"missing {', '.join(missing)}")
    return index


def _tokenizer_max_length(root: Path, default: int) -> int:
    """The tokenizer's ``model_max_length`` (diffusers pads prompts to it), if it is a real limit."""
    cfg_file = root / "tokenizer" / "tokenizer_config.json"
    n = _read_json(cfg_file).get("model_max_length") if cfg_file.is_file() else None
    return int(n) if isinstance(n, (int, float)) and 0 < n <= 100_000 else default


def _default_seconds(root: Path) -> float | None:
    """diffusers' default audio length for the folder: UNet ``sample_size`` x VAE downsampling x 10 ms."""
    size = _read_json(root / "unet" / "config.json").get("sample_size")
    levels = len(_read_json(root / "vae" / "config.json").get("block_out_channels") or [])
    if isinstance(size, int) and not isinstance(size, bool) and size > 0 and levels:
        return size * 2 ** (levels - 1) / 100
    return None


def folder_config(root: str | Path, overrides: Sequence[str] = ()) -> dict:
    """The resolved reaudio configuration that runs the ``AudioLDMPipeline`` folder ``root`` (module docstring),
    with ``overrides`` applied last."""
    root = Path(root)
    read_model_index(root)
    cfg = compose(VARIANT)
    text = cfg["text_encoder"]["params"]
    cfg["text_encoder"] = {"name": "clap", "params": {
        **text, "pretrained": str(root / "text_encoder"), "processor": str(root / "tokenizer"),
        "backend": "transformers", "random_init": False, "max_length": _tokenizer_max_length(root, text["max_length"])}}
    cfg["caption_encoder"] = cfg["audio_encoder"] = cfg["reranker"] = None
    for slot, (folder, name) in WEIGHTS.items():
        params = cfg[slot]["params"] if cfg[slot]["name"] == name else {}
        cfg[slot] = {"name": name, "params": {**params, "checkpoint": str(root / folder)}}
    cfg["denoiser"]["params"].update(text_dim=None, audio_dim=None)
    sched = _read_json(root / "scheduler" / "scheduler_config.json")
    if sched.get("trained_betas") is not None:
        raise ReaudioError(f"{root}/scheduler: trained_betas are not supported; reaudio's samplers are built from "
                           "num_train_timesteps, beta_start, beta_end and beta_schedule")
    cfg["diffusion"].update({k: sched[k] for k in SCHEDULE_KEYS if sched.get(k) is not None})
    gen = cfg["generation"]
    gen.update(retrieval="none", require_weights=False, model=None, database=None)
    seconds = _default_seconds(root)
    if seconds:
        gen.update(duration=seconds, max_duration=max(gen["max_duration"], seconds))
    if sched.get("_class_name") in SAMPLERS:
        gen["sampler"] = SAMPLERS[sched["_class_name"]]
    cfg = compose(None, [], overrides, base=cfg)
    cfg["preset"] = VARIANT
    return cfg


def _plain(value):
    """JSON-comparable form (tuples -> lists, FrozenDicts -> dicts)."""
    return json.loads(json.dumps(value, default=lambda o: dict(o) if hasattr(o, "items") else list(o)))


def config_differences(folder_cfg: dict, built_cfg: dict, ignore=()) -> list[str]:
    """``key: folder X, built Y`` for every setting of ``folder_cfg`` that the built model's configuration
    holds with another value (keys the built model does not know are skipped: older diffusers names)."""
    skip = _IGNORED_KEYS | set(ignore)
    folder_cfg, built_cfg = _plain(folder_cfg), _plain(built_cfg)
    return [f"{k}: folder {v!r}, built {built_cfg[k]!r}" for k, v in sorted(folder_cfg.items())
            if k not in skip and not k.startswith("_") and k in built_cfg and built_cfg[k] != v]


def scheduler_notes(root: Path, cfg: dict) -> list[str]:
    """What of ``root/scheduler`` the configured sampler does not follow."""
    from .pipeline import make_scheduler
    sched = _read_json(root / "scheduler" / "scheduler_config.json")
    name, sampler = sched.get("_class_name"), cfg["generation"]["sampler"]
    if SAMPLERS.get(name) != sampler:
        return [f"{root}/scheduler is a {name}; sampling with reaudio's '{sampler}' sampler "
                f"({', '.join(f'{k} -> {v}' for k, v in SAMPLERS.items())} map to ours)"]
    ours = make_scheduler(cfg, sampler).config
    diffs = config_differences(sched, ours, ignore=SCHEDULE_KEYS)
    return [f"{root}/scheduler settings not followed by the '{sampler}' sampler: {'; '.join(diffs)}"] if diffs else []


def _check_built(pipe, root: Path) -> None:
    """Refuse a folder whose UNet / VAE / vocoder configuration differs from what the plugins built."""
    problems = []
    for slot, (folder, name) in WEIGHTS.items():
        if pipe.cfg[slot]["name"] != name or pipe.cfg[slot]["params"].get("checkpoint") != str(root / folder):
            continue  # the user replaced it
        model = getattr(getattr(pipe, slot), "model", None)
        built = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        ignore = _HEAD_KEYS | ({"scaling_factor"} if slot == "decoder" else set())
        diffs = config_differences(_read_json(root / folder / "config.json"), built, ignore)
        if diffs:
            problems.append(f"{folder}/ ({name}): {'; '.join(diffs)}")
    if problems:
        raise ReaudioError(f"{root}: components that reaudio would run differently from diffusers: "
                           + " | ".join(problems))


def _record_built(pipe, root: Path) -> None:
    """Put the built architecture into ``pipe.cfg`` (the folder paths stay as checkpoints)."""
    for slot, (folder, name) in WEIGHTS.items():
        entry, component = pipe.cfg[slot], getattr(pipe, slot)
        if entry["name"] != name or entry["params"].get("checkpoint") != str(root / folder):
            continue
        built = component.params if slot == "denoiser" else component.config()
        entry["params"] = {**entry["params"], **built, "checkpoint": str(root / folder),
                           "device": entry["params"]["device"]}


def load(cls, root: str | Path, overrides: Sequence[str] = (), db=None):
    """``cls`` (``ReAudioPipeline``) running the ``AudioLDMPipeline`` folder ``root`` (module docstring)."""
    root = Path(root)
    cfg = folder_config(root, overrides)
    for note in scheduler_notes(root, cfg):
        warnings.warn(note, stacklevel=3)
    pipe = cls.from_config(cfg, db=db)
    _check_built(pipe, root)
    _record_built(pipe, root)
    if pipe.reranker is not None and pipe.cfg["text_encoder"]["params"]["pretrained"] == str(root / "text_encoder"):
        pipe._rerank_text = pipe.text_encoder  # the reranker's text side: the folder's CLAP text encoder
    return pipe


# -- export ------------------------------------------------------------------------------------------------
def export_problems(cfg: dict, denoiser_cfg: dict | None = None) -> list[str]:
    """Why a configuration (a saved pipeline's config.yaml, or a built pipeline's) cannot be written as an
    ``AudioLDMPipeline`` folder; empty when it can. ``denoiser_cfg``: the saved denoiser/config.json, which wins."""
    out = []
    want = {"text_encoder": ("clap", "diffusers' AudioLDMPipeline encodes prompts with a ClapTextModelWithProjection"),
            "denoiser": ("unet-ldm", "AudioLDMPipeline runs one UNet2DConditionModel"),
            "decoder": ("vae", "AudioLDMPipeline decodes with an AutoencoderKL"),
            "vocoder": ("hifigan", "AudioLDMPipeline vocodes with a SpeechT5HifiGan")}
    for slot, (name, why) in want.items():
        got = (cfg.get(slot) or {}).get("name")
        if got != name:
            out.append(f"{slot} '{got}' is not '{name}' ({why})")
    if (cfg.get("text_encoder") or {}).get("name") == "clap" and \
            cfg["text_encoder"]["params"].get("backend", "transformers") != "transformers":
        out.append("text_encoder clap backend 'laion' has no transformers model to write")
    if (cfg.get("denoiser") or {}).get("name") == "unet-ldm":
        params = {**cfg["denoiser"]["params"], **(denoiser_cfg or {})}
        streams = {k: params.get(k) for k in ("text_dim", "audio_dim") if params.get(k) is not None}
        if streams:
            out.append(f"the denoiser has retrieval streams ({', '.join(f'{k}={v}' for k, v in streams.items())}); "
                       "AudioLDMPipeline has no retrieved captions or audio to feed them")
        if params.get("freq_channels"):
            out.append(f"the denoiser reads {params['freq_channels']} frequency maps beside the latents "
                       "(freq_channels); AudioLDMPipeline feeds the latents alone")
        if params.get("guidance_embedding"):
            out.append("the denoiser is guidance-distilled (guidance_embedding); AudioLDMPipeline does not pass the "
                       "guidance scale to the UNet")
    return out


def _text_tower(encoder):
    """A ``ClapTextModelWithProjection`` with the text tower and projection of a ``clap`` text encoder."""
    from transformers import ClapTextConfig, ClapTextModelWithProjection
    bundle = encoder.bundle
    if bundle.text_only:
        return bundle.model
    cfg = ClapTextConfig.from_dict({**bundle.config.text_config.to_dict(), "projection_dim": bundle.projection_dim,
                                    "projection_hidden_act": bundle.config.projection_hidden_act})
    tower = ClapTextModelWithProjection(cfg)
    state = {k: v for k, v in bundle.model.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    tower.load_state_dict(state, strict=True)
    return tower.eval()


def export(model_dir: str | Path, out: str | Path) -> Path:
    """Write the saved pipeline ``model_dir`` as a diffusers ``AudioLDMPipeline`` folder ``out`` (which must not
    exist or be empty). Refuses, naming every reason, a pipeline that diffusers cannot run as it runs here."""
    import copy

    from .io import atomic_dir
    from .mel import MEL_FPS
    from .pipeline import ReAudioPipeline, make_scheduler
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReaudioError(f"{out} exists and is not empty; export into a new directory")
    if not is_diffusers_folder(model_dir):
        if not (model_dir / "config.yaml").is_file():
            raise ReaudioError(f"{model_dir} is not a saved pipeline: config.yaml missing")
        den_file = model_dir / "denoiser" / "config.json"
        problems = export_problems(load_config(model_dir), _read_json(den_file) if den_file.is_file() else None)
        if problems:
            raise ReaudioError(f"cannot export {model_dir} as a diffusers {PIPELINE_CLASS}: " + "; ".join(problems))
    pipe = ReAudioPipeline.from_pretrained(model_dir, ["generation.retrieval=none", "caption_encoder=null",
                                                       "audio_encoder=null", "reranker=null"])
    d = pipe.denoiser
    problems = export_problems(pipe.cfg, {"text_dim": d.text_dim, "audio_dim": d.audio_dim,
                                          "freq_channels": getattr(d, "freq_channels", 0)})
    if problems:
        raise ReaudioError(f"cannot export {model_dir} as a diffusers {PIPELINE_CLASS}: " + "; ".join(problems))
    from diffusers import AudioLDMPipeline
    gen = pipe.cfg["generation"]
    unet, vae = d.model, pipe.decoder.model
    frames = int(round(gen["duration"] * MEL_FPS))
    unet.register_to_config(sample_size=frames // pipe.decoder.compression)  # diffusers' default audio length
    vae.register_to_config(scaling_factor=pipe.decoder.scale_factor)
    tokenizer = copy.deepcopy(pipe.text_encoder.bundle.tokenizer)
    tokenizer.model_max_length = pipe.text_encoder.max_length  # diffusers pads and truncates prompts to it
    folder = AudioLDMPipeline(vae=vae, text_encoder=_text_tower(pipe.text_encoder), tokenizer=tokenizer, unet=unet,
                              scheduler=make_scheduler(pipe.cfg, gen["sampler"]), vocoder=pipe.vocoder.model)
    with atomic_dir(out) as tmp:
        folder.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):  # filled while we wrote: never replace it
            raise ReaudioError(f"{out} exists and is not empty; export into a new directory")
    return out
