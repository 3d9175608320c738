"""Contract checks where components meet the core.

Every component the registry builds (:meth:`Registry.create`, and :meth:`Registry.wrap` for one
built another way, e.g. by a class's ``from_pretrained``) comes back *checked*: each output that
crosses an interface of :mod:`reaudio_core.interfaces` is validated, cheaply, as it is returned,
and a violation is a :class:`ContractViolation` (a :class:`ReaudioError`) naming the component, the
distribution that provides it, the method, what was expected and what came back::

    text_encoder 'hashing' (reaudio-hashtext 0.1.0).embed returned rows with L2 norm 3.2
    (row 0 of 4, 4 rows off; expected 1 +- 0.001)

What is checked (B = the batch the method was given):

* ``TextEncoder.embed`` / ``AudioEncoder.embed``: a float32 tensor ``[B, dim]``, finite, every row of
  L2 norm 1 +- 1e-3, the empty text ``""`` (the unconditional prompt) included. An all-zero row is
  allowed only for an all-zero waveform (a silent clip has no direction). Any other zero row is a violation.
* ``TextEncoder.encode_tokens``: ``(states [B, L, token_dim] float32, mask [B, L] bool)``, finite;
  ``L == max_tokens`` when ``max_tokens`` is given.
* ``AudioEncoder.encode_tokens``: ``(tokens [B, num_tokens, token_dim] float32, mask [B, num_tokens] bool)``.
* ``Retriever.search``: ``(scores [Q, k] float32, ids [Q, k] int64)``, no NaN score, every id in
  ``[0, len)`` or the padding id -1.
* ``Decoder.encode``: ``mel [B, T, 64]`` -> ``[B, latent_channels, T / compression, 64 / compression]``
  (T / compression rounded down or up); ``Decoder.decode``: ``[B, C, t, f]`` -> ``[B, t * compression, 64]``.
* ``Vocoder.__call__``: ``mel [B, T, 64]`` -> ``[B, T * hop_length]``.
* ``Denoiser.__call__``: the output has the shape of the latents (finiteness is the sampler's check,
  which says what to do about it).
* ``FeatureModel.embed_frames``: B float32 arrays ``[n >= 1, d]``, one ``d``, finite;
  ``FeatureModel.logits``: ``[B, num_classes]``, finite.

Decoder, vocoder and denoiser outputs may be any floating dtype (they run under autocast); encoder
outputs must be float32 unless autocast is on. An output that carries gradients (a training forward)
is not checked for finiteness: the trainer handles a non-finite loss itself. :func:`check_conditioning`
is the consumer side: the pipeline calls it on the conditioning it hands the denoiser.

Design: why a subclass, not a proxy
-----------------------------------
:func:`checked` changes the *class of the instance* to a subclass made once per component class
(``type(base)(base.__name__, (base,), {...})``) that overrides only the checked methods, each calling
the base's method and then checking what it returned. The object itself is unchanged, so:

* ``isinstance(c, TextEncoder)`` and ``isinstance(c, ThePluginClass)`` stay true; the subclass keeps the
  class's ``__name__``, ``__qualname__`` and ``__module__`` (reprs, messages and fingerprints built from
  ``type(c).__name__`` do not change); ``type(c) is ThePluginClass`` is the one thing that becomes false.
* attribute reads *and writes* (``c.dim``, ``c.model``, ``c.to(...)``, ``c.save_pretrained(...)``,
  ``c.x = 1``) go to the object as before: there is no second object to keep in step.
* ``__call__`` can be checked: Python looks special methods up on the type, which a per-instance
  attribute (or a proxy without every dunder) would miss.
* an ``nn.Module`` component stays that module: parameters, ``state_dict``, ``train()``, optimisers,
  hooks and ``DistributedDataParallel`` see the same object; gradients flow through the checked methods.
* pickling, ``copy.copy`` and ``copy.deepcopy``: the subclass's ``__reduce_ex__`` names the base class and
  re-applies the checks on reconstruction, so a copy (e.g. an EMA copy) is checked too, and a pickle
  never refers to the generated class. (A base class with its own ``__reduce__`` is pickled as it defines
  unless its reduction names the class first, as the default ones do.)

The subclass has ``__slots__ = ()``, so the instance layout does not change and ``__class__`` can be
assigned (where it cannot, the component runs unchecked, with a warning); checking an object twice is a
no-op; :func:`unwrap` puts the original class back. A method set on the instance itself
(``c.embed = f``) shadows the checked one, as it would shadow any method.

Switching the checks off
------------------------
``REAUDIO_CHECKS=0`` in the environment: components are built unchecked and the pipeline skips
:func:`check_conditioning`. :func:`set_enabled` / :func:`disabled` switch the checks of already checked
components at run time (``benchmarks/checks.py`` measures the cost: well under 1% of a generation).
Parameter type checks (:meth:`Registry.resolve_params`) and the pipeline's wiring errors stay on.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .interfaces import BASES
from .registry import ReaudioError

ENV_VAR = "REAUDIO_CHECKS"
NORM_TOL = 1e-3
N_MELS = 64

_enabled = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether outputs are checked now (``REAUDIO_CHECKS``, :func:`set_enabled`)."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Switch the checks on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@contextlib.contextmanager
def disabled():
    """``with disabled(): ...`` runs checked components without their checks."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


class ContractViolation(ReaudioError):
    """A component returned something its contract (``reaudio_core/interfaces.py``) rules out."""


@dataclass(frozen=True)
class Origin:
    """Who a checked component is: its kind, registered name and providing distribution."""
    kind: str
    name: str
    source: str = "?"  #: "distribution version"

    def __str__(self) -> str:
        return f"{self.kind} '{self.name}' ({self.source})"


@dataclass
class _Call:
    obj: Any
    origin: Origin
    method: str
    args: tuple
    kwargs: dict

    def arg(self, index: int, name: str, default=None):
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)

    def fail(self, got: str, expected: str):
        raise ContractViolation(f"{self.origin}.{self.method} returned {got} (expected {expected})")


# -- building blocks ------------------------------------------------------------------------------
def _batch(x) -> int | None:
    try:
        return len(x)
    except TypeError:
        return None


def _autocast() -> bool:
    try:
        return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _tensor(call: _Call, x, what: str) -> torch.Tensor:
    if not torch.is_tensor(x):
        call.fail(f"{what} of type {type(x).__name__}", "a torch.Tensor")
    return x


def _shape(call: _Call, x, expected: tuple, names: str, what: str) -> None:
    """``expected``: ints, None (any), or tuples of allowed values."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(
        e is None or (s in e if isinstance(e, tuple) else s == e) for s, e in zip(shape, expected))
    if not ok:
        want = ", ".join("?" if e is None else "/".join(map(str, e)) if isinstance(e, tuple) else str(e)
                         for e in expected)
        call.fail(f"{what} of shape {list(shape)}", f"[{want}] = {names}")


def _floating(call: _Call, x: torch.Tensor, what: str, strict: bool) -> None:
    if x.dtype == torch.float32 or (x.is_floating_point() and (not strict or _autocast())):
        return
    call.fail(f"{what} of dtype {x.dtype}", "torch.float32" if strict else "a floating-point dtype")


def _finite(call: _Call, x, what: str) -> None:
    if torch.is_tensor(x):
        if x.requires_grad or bool(torch.isfinite(x).all()):
            return
        bad, total = int((~torch.isfinite(x)).sum()), x.numel()
    else:
        finite = np.isfinite(x)
        if finite.all():
            return
        bad, total = int((~finite).sum()), finite.size
    call.fail(f"{what} with {bad} non-finite values of {total}", "finite values")


def _mask(call: _Call, mask, shape: tuple, what: str = "mask") -> None:
    mask = _tensor(call, mask, what)
    if tuple(mask.shape) != tuple(shape):
        call.fail(f"a {what} of shape {list(mask.shape)}", f"{list(shape)}, one entry per token")
    if mask.dtype != torch.bool:
        call.fail(f"a {what} of dtype {mask.dtype}", "torch.bool")


def _pair(call: _Call, out, what: str):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        call.fail(f"a {type(out).__name__}", f"a pair ({what})")
    return out


def _silent(wave) -> bool:
    return not np.any(np.asarray(wave))


def _normalised(call: _Call, emb: torch.Tensor, inputs, empty: Callable[[Any], bool], kind: str) -> None:
    if emb.requires_grad or emb.numel() == 0:
        return
    norms = emb.detach().double().norm(dim=1)
    off = ((norms - 1).abs() > NORM_TOL).nonzero().flatten().tolist()
    if not off:
        return

    def item(i):
        try:
            return inputs[i]
        except (TypeError, IndexError, KeyError):
            return None

    bad = [i for i in off if not (norms[i] == 0 and item(i) is not None and empty(item(i)))]
    if not bad:
        return
    i = bad[0]
    if norms[i] == 0:
        shown = repr(item(i)[:60]) if isinstance(item(i), str) else f"a non-silent {kind}"
        call.fail(f"an all-zero row for {shown} (row {i})",
                  f"L2 norm 1 +- {NORM_TOL}" + ("; only a silent waveform may embed to zeros" if kind == "waveform" else
                                                 ", the empty text included"))
    call.fail(f"rows with L2 norm {float(norms[i]):.4g} (row {i} of {len(norms)}, {len(bad)} rows off)",
              f"1 +- {NORM_TOL}")


# -- the checks, per kind and method ------------------------------------------------------------------
def _embed(empty: Callable[[Any], bool], kind: str):
    def check(call: _Call, out) -> None:
        inputs = call.arg(0, "texts" if kind == "text" else "waveforms")
        emb = _tensor(call, out, "an embedding")
        _shape(call, emb, (_batch(inputs), call.obj.dim), "[B, dim]", "an embedding")
        _floating(call, emb, "an embedding", strict=True)
        _finite(call, emb, "an embedding")
        _normalised(call, emb, inputs, empty, kind)
    return check


def _text_tokens(call: _Call, out) -> None:
    states, mask = _pair(call, out, "states, mask")
    states = _tensor(call, states, "states")
    max_tokens = call.arg(1, "max_tokens")
    _shape(call, states, (_batch(call.arg(0, "texts")), max_tokens or None, call.obj.token_dim),
           "[B, max_tokens, token_dim]" if max_tokens else "[B, L, token_dim]", "states")
    _floating(call, states, "states", strict=True)
    _finite(call, states, "states")
    _mask(call, mask, states.shape[:2])


def _audio_tokens(call: _Call, out) -> None:
    tokens, mask = _pair(call, out, "tokens, mask")
    tokens = _tensor(call, tokens, "tokens")
    B = _batch(call.arg(0, "waveforms"))
    if tokens.ndim == 3 and tokens.shape[1] != call.obj.num_tokens:
        call.fail(f"{tokens.shape[1]} tokens per clip (shape {list(tokens.shape)})",
                  f"num_tokens={call.obj.num_tokens} per clip")
    _shape(call, tokens, (B, call.obj.num_tokens, call.obj.token_dim), "[B, num_tokens, token_dim]", "tokens")
    _floating(call, tokens, "tokens", strict=True)
    _finite(call, tokens, "tokens")
    _mask(call, mask, tokens.shape[:2])


def _search(call: _Call, out) -> None:
    scores, ids = _pair(call, out, "scores, ids")
    queries, k = call.arg(0, "queries"), call.arg(1, "k")
    Q = np.shape(queries)[0] if np.ndim(queries) == 2 else None
    for what, x, dtype in (("scores", scores, np.float32), ("ids", ids, np.int64)):
        if not isinstance(x, np.ndarray):
            call.fail(f"{what} of type {type(x).__name__}", "a numpy array")
        _shape(call, x, (Q, int(k) if k is not None else None), "[Q, k]", what)
        if x.dtype != dtype:
            call.fail(f"{what} of dtype {x.dtype}", np.dtype(dtype).name)
    if np.isnan(scores).any():
        call.fail("NaN scores", "scores, -inf for padding")
    n = len(call.obj)
    bad = (ids < -1) | (ids >= n)
    if bad.any():
        call.fail(f"id {int(ids[bad][0])}", f"ids in [0, {n}) for an index of {n} vectors, or -1 for padding")


def _array(call: _Call, out, expected: tuple, names: str, what: str) -> None:
    """A floating tensor of shape ``expected`` (see :func:`_shape`), finite: decoder, vocoder, logits."""
    x = _tensor(call, out, what)
    _shape(call, x, expected, names, what)
    _floating(call, x, what, strict=False)
    _finite(call, x, what)


def _encode(call: _Call, out) -> None:
    mel, d = call.arg(0, "mel"), call.obj
    c = d.compression
    T = mel.shape[1] if torch.is_tensor(mel) and mel.ndim == 3 else None
    t = None if T is None else T // c if T % c == 0 else (T // c, T // c + 1)
    _array(call, out, (_batch(mel), d.latent_channels, t, N_MELS // c),
           "[B, latent_channels, T / compression, 64 / compression]", "latents")


def _decode(call: _Call, out) -> None:
    lat = call.arg(0, "latents")
    t = lat.shape[2] * call.obj.compression if torch.is_tensor(lat) and lat.ndim == 4 else None
    _array(call, out, (_batch(lat), t, N_MELS), "[B, t * compression, 64]", "a mel")


def _vocode(call: _Call, out) -> None:
    mel = call.arg(0, "mel")
    n = mel.shape[1] * call.obj.hop_length if torch.is_tensor(mel) and mel.ndim == 3 else None
    _array(call, out, (_batch(mel), n), "[B, T * hop_length]", "a waveform")


def _denoise(call: _Call, out) -> None:
    latents = call.arg(0, "latents")
    eps = _tensor(call, out, "a prediction")
    if torch.is_tensor(latents) and eps.shape != latents.shape:
        call.fail(f"a prediction of shape {list(eps.shape)}", f"the latents' shape {list(latents.shape)}")
    _floating(call, eps, "a prediction", strict=False)


def _frames(call: _Call, out) -> None:
    B = _batch(call.arg(0, "wavs"))
    if not isinstance(out, (list, tuple)) or (B is not None and len(out) != B):
        call.fail(f"{type(out).__name__} of {_batch(out)} entries", f"a list of {B} arrays, one per clip")
    widths = set()
    for i, x in enumerate(out):
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[0] < 1:
            call.fail(f"entry {i} {getattr(x, 'shape', type(x).__name__)}", "[n_frames >= 1, d] arrays")
        if x.dtype != np.float32:
            call.fail(f"entry {i} of dtype {x.dtype}", "float32")
        _finite(call, x, f"entry {i}")
        widths.add(x.shape[1])
    if len(widths) > 1:
        call.fail(f"frames of widths {sorted(widths)}", "one width d for every clip")


def _logits(call: _Call, out) -> None:
    _array(call, out, (_batch(call.arg(0, "wavs")), call.obj.num_classes), "[B, num_classes]", "logits")


CHECKS: dict[str, dict[str, Callable[[_Call, Any], None]]] = {
    "text_encoder": {"embed": _embed(lambda text: False, "text"), "encode_tokens": _text_tokens},
    "audio_encoder": {"embed": _embed(_silent, "waveform"), "encode_tokens": _audio_tokens},
    "retriever": {"search": _search},
    "decoder": {"encode": _encode, "decode": _decode},
    "vocoder": {"__call__": _vocode},
    "denoiser": {"__call__": _denoise},
    "feature_model": {"embed_frames": _frames, "logits": _logits},
}


# -- the wrapper -----------------------------------------------------------------------------------
_CLASSES: dict[tuple[type, Origin], type] = {}


def _checked_method(original: Callable, method: str, check: Callable[[_Call, Any], None]) -> Callable:
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if _enabled:
            check(_Call(self, type(self)._reaudio_origin, method, args, kwargs), out)
        return out
    return wrapper


def _reduce_ex(self, protocol):
    """Pickle / copy as the base class, with the checks re-applied on reconstruction. The default reductions
    (``copyreg.__newobj__``, ``__newobj_ex__``, ``_reconstructor``) name the class first among their arguments."""
    cls = type(self)
    rv = cls.__bases__[0].__reduce_ex__(self, protocol)
    if isinstance(rv, tuple) and len(rv) >= 2 and isinstance(rv[1], tuple) and rv[1] and rv[1][0] is cls:
        return (_rebuild, (cls._reaudio_origin, rv[0], (cls.__bases__[0], *rv[1][1:]))) + tuple(rv[2:])
    return rv


def _rebuild(origin: Origin, func: Callable, args: tuple):
    obj = func(*args)
    obj.__class__ = _checked_class(type(obj), origin)
    return obj


def _checked_class(base: type, origin: Origin) -> type:
    key = (base, origin)
    cls = _CLASSES.get(key)
    if cls is None:
        ns = {"__slots__": (), "__module__": base.__module__, "__qualname__": base.__qualname__,
              "__doc__": base.__doc__, "_reaudio_origin": origin, "__reduce_ex__": _reduce_ex}
        for method, check in CHECKS[origin.kind].items():
            original = getattr(base, method, None)
            if callable(original):
                ns[method] = _checked_method(original, method, check)
        cls = _CLASSES[key] = type(base)(base.__name__, (base,), ns)
    return cls


def is_checked(obj) -> bool:
    return "_reaudio_origin" in type(obj).__dict__


def origin(obj) -> Origin | None:
    """Who a checked component is (None for an unchecked one)."""
    return type(obj).__dict__.get("_reaudio_origin")


def checked(obj, kind: str | None = None, name: str | None = None, source: str = "?"):
    """``obj`` with its outputs checked against the contract of ``kind`` (default: the kind whose base
    class it implements), reported as ``kind 'name' (source)``. Returns ``obj`` itself, its class
    swapped for a checking subclass (see the module docstring); unchanged when checks are off
    (``REAUDIO_CHECKS=0``) or it is already checked."""
    if not _enabled or is_checked(obj):
        return obj
    if kind is None:
        kind = next((k for k, b in BASES.items() if isinstance(obj, b)), None)
        if kind is None:
            raise ContractViolation(f"{type(obj).__name__} implements none of the component contracts "
                                    f"({', '.join(b.__name__ for b in BASES.values())})")
    base = BASES[kind]
    label = Origin(kind, name or type(obj).__name__, source)
    if not isinstance(obj, base):
        raise ContractViolation(f"{label} is a {type(obj).__name__}, which does not implement {base.__name__}")
    try:
        obj.__class__ = _checked_class(type(obj), label)
    except TypeError as exc:  # a class that cannot be subclassed this way (e.g. a C layout): run it unchecked
        warnings.warn(f"{label}: its outputs cannot be checked ({exc})", stacklevel=2)
    return obj


def unwrap(obj):
    """Undo :func:`checked` (in place); returns ``obj``."""
    if is_checked(obj):
        obj.__class__ = type(obj).__bases__[0]
    return obj


# -- the consumer side ---------------------------------------------------------------------------------
def check_conditioning(cond, uncond, denoiser, sources: dict[str, str] | None = None) -> None:
    """What the pipeline hands the denoiser: every stream of ``cond`` and ``uncond`` (a
    :class:`~reaudio_core.interfaces.Conditioning` each) is as wide as the denoiser was built for, the
    two agree in batch and length (classifier-free guidance concatenates them), and every mask is
    ``[B, L]`` bool. ``sources``: stream -> the component that made it, for the message."""
    sources = sources or {}
    streams = (("prompt", None, denoiser.prompt_dim), ("captions", "caption_mask", denoiser.text_dim),
               ("audio", "audio_mask", denoiser.audio_dim))
    for field, mask_field, width in streams:
        c, u = getattr(cond, field), getattr(uncond, field)
        if width is None or c is None or u is None:
            continue
        who = f" from {sources[field]}" if field in sources else ""
        for label, x in (("conditional", c), ("unconditional", u)):
            if x.shape[-1] != width or x.ndim != (2 if mask_field is None else 3):
                raise ContractViolation(f"the {label} '{field}' stream{who} has shape {list(x.shape)}; the denoiser "
                                        f"expects [B, {'' if mask_field is None else 'L, '}{width}]")
            if mask_field is not None:
                m = getattr(cond if label == "conditional" else uncond, mask_field)
                if m is None or tuple(m.shape) != tuple(x.shape[:2]) or m.dtype != torch.bool:
                    raise ContractViolation(
                        f"the {label} '{mask_field}'{who} is {None if m is None else (list(m.shape), m.dtype)}; "
                        f"expected a bool mask {list(x.shape[:2])}")
        if c.shape[:-1] != u.shape[:-1]:
            raise ContractViolation(
                f"the '{field}' stream{who}: the conditional input has shape {list(c.shape)}, the unconditional "
                f"{list(u.shape)}; they must agree (retrieved neighbours x tokens per neighbour)")


# -- the encoders a model was trained with ------------------------------------------------------------
ENCODER_SLOTS = ("text_encoder", "caption_encoder", "audio_encoder")
RUNTIME_PARAMS = ("device", "batch_size", "threads")  #: change how, not what, an encoder computes
WEIGHT_PARAMS = ("weights", "checkpoint", "pretrained", "model_path")  #: where weights come from


def encoder_swaps(trained: dict, cfg: dict, model: str = "the model", loaded=()) -> list[str]:
    """One note per encoder slot in which ``cfg`` (what runs) names another component, or gives it other
    parameters, than ``trained`` (the model's saved configuration) records. Runtime knobs
    (:data:`RUNTIME_PARAMS`) do not count, nor do weight locations (:data:`WEIGHT_PARAMS`) of the slots in
    ``loaded`` (their weights come from the model directory). A parameter the record lacks counts as its
    registered default."""
    from .config import SLOTS
    from .registry import get_registry
    notes = []
    for slot in ENCODER_SLOTS:
        was, now = trained.get(slot), cfg.get(slot)
        if not isinstance(was, dict) or not isinstance(now, dict) or "name" not in was:
            continue
        if was["name"] != now["name"]:
            notes.append(f"{model} was trained with {slot} '{was['name']}', this run uses {slot} '{now['name']}': "
                         f"the model never saw its outputs, expect noise (use {slot}={was['name']})")
            continue
        spec = get_registry().components.get((SLOTS[slot], now["name"]))
        a, b = was.get("params") or {}, now.get("params") or {}
        skip = set(RUNTIME_PARAMS) | (set(WEIGHT_PARAMS) if slot in loaded else set())
        default = spec.default if spec is not None else (lambda key: None)
        changed = [k for k in sorted(set(a) | set(b)) if k not in skip
                   and a.get(k, default(k)) != b.get(k, default(k))]
        if changed:
            what = ", ".join(f"{k} {a.get(k, default(k))!r} -> {b.get(k, default(k))!r}" for k in changed)
            notes.append(f"{model} was trained with {slot} '{was['name']}' configured otherwise; this run changes "
                         f"{what} (its outputs may differ from those the model was trained on)")
    return notes
