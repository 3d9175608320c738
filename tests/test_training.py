"""`reaudio train`: stages, checkpoints, resume after kill -9, faults, DDP and the distributed index build.

Everything runs on tiny components and a handful of 1 s synthetic clips. Multi-process runs go
through real subprocesses (`python -m reaudio_core.cli`, `torchrun --nproc_per_node 2` over gloo).
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, make_clip, single_torch_thread
from reaudio_core import ReaudioError
from reaudio_core import training as T
from reaudio_core.config import compose

TINY_VAE = {"block_out_channels": [8, 16, 16], "layers_per_block": 1, "latent_channels": 8, "norm_num_groups": 4}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(args, env_extra=None, check=True, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    # own session: on a timeout the whole tree (torchrun and its workers) is killed, never left behind
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    proc = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}")
    return proc


def cli(*args, **kw):
    return run([sys.executable, "-m", "reaudio_core.cli", *map(str, args)], **kw)


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / T.LOG_FILE).read_text().splitlines()]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread in this process (and OMP_NUM_THREADS=1 in subprocesses): on a shared 2-core
    machine, two spinning OpenMP threads per process make tiny models 10x slower."""
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six 1 s clips in three 'classes' (captions repeat per class), a manifest, and a manifest that
    also lists a corrupt FLAC, a truncated WAV and a missing file."""
    root = tmp_path_factory.mktemp("clips")
    rows = ["path,caption,label"]
    names = ["a dog barks", "rain falls on a roof", "church bells ring"]
    for i in range(6):
        make_clip(root / f"c{i}.wav", seconds=1.0, freq=220 * (1 + i % 3) + 30 * i, seed=i)
        rows.append(f"c{i}.wav,{names[i % 3]},class{i % 3}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    (root / "corrupt.flac").write_bytes(b"fLaC\x00\x00\x00\x22" + os.urandom(200))
    good = (root / "c0.wav").read_bytes()
    (root / "truncated.wav").write_bytes(good[:60])  # header cut inside the fmt chunk
    bad = rows + ["corrupt.flac,a broken file,class0", "truncated.wav,a cut file,class1", "gone.wav,a missing file,class2"]
    (root / "bad.csv").write_text("\n".join(bad) + "\n")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """An untrained tiny VAE saved with save_pretrained (what the vae stage exports)."""
    from reaudio_core import create
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vae") / "decoder"
    create("decoder", "vae", **TINY_VAE, scale_factor=0.9).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory, data):
    from reaudio_core.database import build_database
    out = tmp_path_factory.mktemp("db") / "db"
    cfg = compose(None, overrides=["text_encoder=minilm", "retriever=torch", "database.neighbours=4"])
    build_database([data / "m.csv"], out, cfg, progress=False)
    return out


def vae_yaml(tmp: Path, manifest: Path, **training) -> Path:
    cfg = {"decoder": {"name": "vae", "params": TINY_VAE},
           "training": {"stage": "vae", "manifest": [str(manifest)], "batch_size": 2, "lr": 1e-3, "warmup_steps": 2,
                        "max_steps": 3, "checkpoint_every": 2, "log_every": 1, "crop_seconds": 0.32,
                        "ema_decay": 0.9, "threads": 1, **training}}
    path = tmp / "vae.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ldm_yaml(tmp: Path, db: Path, vae: Path, **training) -> Path:
    cfg = {"text_encoder": "minilm", "caption_encoder": "minilm",
           "audio_encoder": {"name": "vae-latent", "params": {"weights": str(vae), "num_tokens": 4}},
           "decoder": {"name": "vae", "params": {"checkpoint": str(vae)}},
           "denoiser": {"name": "unet-ldm", "params": {"size": "tiny", "prompt_dim": 384, "text_dim": 384,
                                                       "audio_dim": 128}},
           "vocoder": {"name": "griffin-lim", "params": {"n_iter": 2}},
           "generation": {"retrieval": "audio+text", "k": 2, "caption_tokens": 8, "duration": 0.32, "steps": 2},
           "training": {"stage": "ldm", "database": str(db), "batch_size": 2,
                        "lr": 1e-3, "warmup_steps": 2, "max_steps": 6, "checkpoint_every": 2, "log_every": 1,
                        "crop_seconds": 0.32, "ema_decay": 0.99, "threads": 1, **training}}
    path = tmp / "ldm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- the vae stage, bad audio ----------------------------------------------------------------------
def test_vae_stage_skips_bad_audio_and_exports_scale_factor(tmp_path, data):
    from reaudio_plugins.vae import VAE
    cfg = compose(None, [vae_yaml(tmp_path, data / "bad.csv")])
    result = T.train(cfg, tmp_path / "out", progress=False)
    assert result.steps == 3 and result.start_step == 0
    skipped = {Path(p.split(" ")[0]).name: reason for p, reason in result.skipped}
    assert set(skipped) == {"corrupt.flac", "truncated.wav", "gone.wav"}
    assert "missing file" in skipped["gone.wav"] and "unreadable" in skipped["corrupt.flac"]
    report = (tmp_path / "out" / T.SKIP_REPORT).read_text()
    assert "corrupt.flac" in report and "truncated.wav" in report
    assert "skipped 3 clip(s)" in result.summary()
    rows = log_rows(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert {"recon", "kl", "lr", "grad_norm"} <= set(rows[0])
    # final export: the EMA weights with the measured scale factor, loadable by the plugin
    vae = VAE.from_pretrained(tmp_path / "out" / "final" / "decoder")
    assert vae.scale_factor == pytest.approx(result.extra["scale_factor"]) and vae.scale_factor != 1.0
    saved = yaml.safe_load((tmp_path / "out" / "final" / "config.yaml").read_text())
    assert saved["decoder"]["params"]["scale_factor"] == pytest.approx(vae.scale_factor)
    mel = torch.randn(1, 32, 64)
    assert vae.decode(vae.encode(mel)).shape == (1, 32, 64)
    state = T.load_checkpoint(T.list_checkpoints(tmp_path / "out")[-1][1])
    assert state["step"] == 3 and state["ema"] is not None and "python_state" in state["rng"]


def test_vae_freeze_encoder_trains_the_decoder_only(tmp_path, data, vae_dir):
    """Stage 1b of the offline preset: a new decoder for a VAE whose latents an LDM was trained on."""
    from safetensors.torch import load_file

    from reaudio_plugins.vae import VAE
    cfg = compose(None, [vae_yaml(tmp_path, data / "m.csv", freeze_encoder=True, ema_decay=0, lr_decay="cosine")],
                  overrides=[f"decoder.params={{checkpoint: {vae_dir}}}"])
    result = T.train(cfg, tmp_path / "out", progress=False)
    before, after = load_file(vae_dir / "model.safetensors"), load_file(tmp_path / "out/final/decoder/model.safetensors")
    frozen = [k for k in before if k.split(".")[0] in ("encoder", "quant_conv")]
    trained = [k for k in before if k.split(".")[0] in ("decoder", "post_quant_conv")]
    assert frozen and trained and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    # same encoder, same latent space: the scale factor an LDM was trained with is kept, not re-measured
    assert VAE.from_pretrained(tmp_path / "out/final/decoder").scale_factor == 0.9 == result.extra["scale_factor"]
    lrs = [r["lr"] for r in log_rows(tmp_path / "out")]
    assert lrs[-1] < lrs[-2]  # cosine decay after the 2 warm-up steps
    with pytest.raises(ReaudioError, match="freeze_encoder needs a trained VAE"):
        T.train(compose(None, [vae_yaml(tmp_path, data / "m.csv", freeze_encoder=True)]), tmp_path / "o2",
                progress=False)


def test_vae_adversarial_decoder_training(tmp_path, data, vae_dir):
    """training.adversarial_weight: a patch discriminator trains beside the decoder in one optimizer step;
    its gradient comes from its hinge loss only, the decoder's from reconstruction + the adaptive-weighted
    adversarial term; it is checkpointed (resumable) but not exported."""
    from safetensors.torch import load_file
    cfg = compose(None, [vae_yaml(tmp_path, data / "m.csv", freeze_encoder=True, ema_decay=0,
                                  adversarial_weight=0.5)],
                  overrides=[f"decoder.params={{checkpoint: {vae_dir}}}"])
    result = T.train(cfg, tmp_path / "out", progress=False)
    rows = log_rows(tmp_path / "out")
    assert {"g_adv", "d_loss", "adv_weight", "d_real", "d_fake"} <= set(rows[0])
    assert all(np.isfinite(r["loss"]) and r["adv_weight"] > 0 for r in rows)
    state = T.load_checkpoint(T.list_checkpoints(tmp_path / "out")[-1][1])
    assert any(k.startswith("disc.") for k in state["model"])
    exported = load_file(tmp_path / "out/final/decoder/model.safetensors")
    assert set(exported) == set(load_file(vae_dir / "model.safetensors"))  # the decoder only, no discriminator
    assert result.steps == 3

    # gradients: discriminator <- hinge loss only; decoder <- recon + weight * generator term
    from reaudio_plugins.vae import VAE
    torch.manual_seed(0)
    obj = T.VaeObjective(VAE.from_pretrained(vae_dir), "l1", 1e-6, adversarial_weight=0.5).eval()
    batch = {"mel": torch.randn(2, 32, 64)}
    out = obj(batch, seed=3)
    out["loss"].backward()
    d_grads = [p.grad.clone() for p in obj.disc.parameters()]
    obj.zero_grad()
    rec = obj.ae.decode(obj.decoder.posterior(batch["mel"]).sample(
        generator=torch.Generator().manual_seed(3))).sample.squeeze(1)
    hinge = (torch.relu(1 - obj.disc(batch["mel"][:, None])).mean()
             + torch.relu(1 + obj.disc(rec.detach()[:, None])).mean())
    assert hinge.item() == pytest.approx(out["d_loss"].item(), rel=1e-5)
    hinge.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(d_grads, obj.disc.parameters()))
    assert out["adv_weight"] > 0 and obj.ae.decoder.conv_out.weight.grad is None  # hinge never reaches the decoder


def test_lr_factor_warmup_then_constant_or_cosine():
    const, cos = T.lr_factor(4, 14, "none"), T.lr_factor(4, 14, "cosine")
    assert [const(s) for s in range(4)] == [cos(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert const(10) == const(100) == 1.0
    assert cos(4) == 1.0 and cos(9) == pytest.approx(0.5) and cos(14) == pytest.approx(0.0) and cos(20) == pytest.approx(0.0)
    assert T.lr_factor(0, 10, "none")(0) == 1.0
    with pytest.raises(ReaudioError, match="lr_decay"):
        T.lr_factor(0, 10, "linear")


def test_vocoder_stage_gets_gradients_and_exports(tmp_path, data):
    from reaudio_plugins.hifigan import HiFiGAN
    cfg = {"vocoder": {"name": "hifigan", "params": {"upsample_initial_channel": 32, "resblock_kernel_sizes": [3],
                                                     "resblock_dilation_sizes": [[1, 3, 5]]}},
           "training": {"stage": "vocoder", "manifest": [str(data / "m.csv")], "batch_size": 2, "lr": 2e-4,
                        "warmup_steps": 0, "max_steps": 2, "log_every": 1, "crop_seconds": 0.16, "ema_decay": 0,
                        "threads": 1}}
    (tmp_path / "voc.yaml").write_text(yaml.safe_dump(cfg))
    T.train(compose(None, [tmp_path / "voc.yaml"]), tmp_path / "out", progress=False)
    rows = log_rows(tmp_path / "out")
    assert all(r["grad_norm"] > 0 and {"mel_l1", "stft"} <= set(r) for r in rows)  # an untrained, near-silent
    voc = HiFiGAN.from_pretrained(tmp_path / "out" / "final" / "vocoder")       # generator still learns
    assert voc(torch.zeros(1, 8, 64)).shape == (1, 1280)


def test_precision_bf16_on_cpu_and_fp16_needs_cuda(tmp_path, data):
    cfg = compose(None, [vae_yaml(tmp_path, data / "m.csv", max_steps=1, precision="bf16", ema_decay=0)])
    result = T.train(cfg, tmp_path / "bf16", progress=False)
    assert np.isfinite(result.last_loss)
    cfg["training"]["precision"] = "fp16"
    with pytest.raises(ReaudioError, match="fp16 needs CUDA"):
        T.train(cfg, tmp_path / "fp16", progress=False)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch, capsys):
    from reaudio_core.cli import main
    monkeypatch.setenv(T.NAN_HOOK, "3")
    cfg = vae_yaml(tmp_path, data / "m.csv", max_steps=5)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 3" in err and "step-00000002.pt" in err
    ckpts = T.list_checkpoints(tmp_path / "out")
    assert [s for s, _ in ckpts] == [2]
    assert T.load_checkpoint(ckpts[0][1])["step"] == 2
    assert not (tmp_path / "out" / "final").exists()
    # a second run into the same directory must say --resume
    monkeypatch.delenv(T.NAN_HOOK)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    # and resuming with a changed model is refused, naming the key
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet", "--resume",
                 "training.lr=0.5"]) == 2
    assert "training.lr" in capsys.readouterr().err


def test_a_failed_checkpoint_write_never_damages_the_previous_one(tmp_path, monkeypatch):
    good = {"format": T.CHECKPOINT_FORMAT, "version": 1, "step": 4, "model": {"w": torch.arange(6.0)}}
    T.save_checkpoint(tmp_path, good)
    path = T.checkpoint_path(tmp_path, 4)
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **kw):  # half a file, then the disk "fills up"
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    for step in (4, 6):  # overwrite the same step, and write a newer one
        with pytest.raises(OSError):
            T.save_checkpoint(tmp_path, {**good, "step": step, "model": {"w": torch.zeros(6)}})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert [s for s, _ in T.list_checkpoints(tmp_path)] == [4]
    assert sorted(p.name for p in (tmp_path / T.CHECKPOINT_DIR).iterdir()) == [path.name]  # no temp files left
    found, state = T.latest_checkpoint(tmp_path)
    assert found == path and torch.equal(state["model"]["w"], torch.arange(6.0))
    # a newer file that is damaged anyway (e.g. copied in half) is passed over on resume
    (tmp_path / T.CHECKPOINT_DIR / "step-00000008.pt").write_bytes(before[: len(before) // 3])
    assert T.latest_checkpoint(tmp_path)[0] == path


def test_rng_state_round_trip():
    import random
    state = T.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    T.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["numpy_pos"] == state["numpy_pos"]


def test_training_crops_follow_the_reference_front_end():
    rng = np.random.default_rng(0)
    short = (0.2 + 0.1 * rng.standard_normal(1000)).astype(np.float32)  # DC offset, shorter than the crop
    seg = T.crop_waveform(short, 1600, np.random.default_rng(1))
    assert seg.shape == (1600,) and np.all(seg[1000:] == 0)  # normalised first, then zero-padded
    assert abs(seg[:1000].mean()) < 1e-6 and np.abs(seg).max() == pytest.approx(0.5)
    long = rng.standard_normal(50_000).astype(np.float32)
    a, b = (T.crop_waveform(long, 1600, np.random.default_rng(s)) for s in (5, 5))
    assert np.array_equal(a, b) and not np.array_equal(a, T.crop_waveform(long, 1600, np.random.default_rng(6)))


def test_step_batches_resume_where_they_left_off():
    from reaudio_core.distributed import DistEnv
    full = list(T.StepBatches(7, 2, DistEnv(), seed=3, start=0, stop=10))
    assert list(T.StepBatches(7, 2, DistEnv(), seed=3, start=4, stop=10)) == full[4:]
    assert len({tuple(i for i, _ in b) for b in full[:3]}) == 3 and all(len(b) == 2 for b in full)
    # two ranks split every epoch's permutation without overlap
    r0 = list(T.StepBatches(8, 2, DistEnv(rank=0, world=2), seed=3, start=0, stop=2))
    r1 = list(T.StepBatches(8, 2, DistEnv(rank=1, world=2), seed=3, start=0, stop=2))
    ids = [i for b in r0 + r1 for i, _ in b]
    assert sorted(ids) == list(range(8))


def test_component_fingerprint_follows_the_weights(vae_dir):
    from reaudio_core import create
    a = create("audio_encoder", "vae-latent", weights=str(vae_dir), num_tokens=4)
    b = create("audio_encoder", "vae-latent", weights=str(vae_dir), num_tokens=4)
    assert T.component_fingerprint(a) == T.component_fingerprint(b)
    with torch.no_grad():
        next(b.vae.model.encoder.parameters()).add_(1e-3)
    assert T.component_fingerprint(a) != T.component_fingerprint(b)


# -- vae-latent audio encoder ------------------------------------------------------------------------
def test_vae_latent_encoder(tmp_path, vae_dir):
    from reaudio_core import create
    from reaudio_plugins.vae_latent import VaeLatentEncoder
    enc = create("audio_encoder", "vae-latent", weights=str(vae_dir), num_tokens=4)
    assert enc.dim == enc.token_dim == 8 * 16
    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(12800).astype(np.float32) * 0.1, rng.standard_normal(900).astype(np.float32)]
    tokens, mask = enc.encode_tokens(wavs)
    assert tokens.shape == (2, 4, 128) and mask.all()
    emb = enc.embed(wavs)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
    # the embedding is the normalised mean of the latent frames; the tokens pool the same frames
    frames = enc.latent_frames(wavs[:1])[0]
    assert torch.allclose(emb[0], torch.nn.functional.normalize(frames.mean(0), dim=0), atol=1e-6)
    assert frames.shape == (20, 128)  # 80 mel frames -> 20 latent frames -> 4 tokens of 5 frames each
    assert torch.allclose(tokens[0], frames.reshape(4, 5, 128).mean(1), atol=1e-6)
    enc.save_pretrained(tmp_path / "ae")
    assert sorted(p.name for p in (tmp_path / "ae" / "vae").iterdir()) == ["config.json", "encoder.safetensors"]
    again = VaeLatentEncoder.from_pretrained(tmp_path / "ae")
    assert torch.equal(again.encode_tokens(wavs)[0], tokens)
    assert enc.vae.scale_factor == again.vae.scale_factor == 0.9
    with pytest.raises(ReaudioError, match="not a directory"):
        create("audio_encoder", "vae-latent", weights=str(tmp_path / "nope"))


# -- the ldm stage: kill -9, resume, export ----------------------------------------------------------
@pytest.mark.slow  # kill -9 of a training process, then two more runs
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, db_dir, vae_dir):
    from safetensors.torch import load_file
    cfg = ldm_yaml(tmp_path, db_dir, vae_dir, max_steps=5)
    T.train(compose(None, [cfg]), tmp_path / "straight", progress=False)  # uninterrupted, in this process
    # the interrupted run loads data in a worker process: the batches must not depend on that
    killed = cli("train", "--config", cfg, "--out", tmp_path / "resumed", "--quiet", "training.num_workers=1",
                 env_extra={T.KILL_HOOK: "3"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [s for s, _ in T.list_checkpoints(tmp_path / "resumed")] == [2]
    assert [r["step"] for r in log_rows(tmp_path / "resumed")] == [1, 2, 3]
    assert not (tmp_path / "resumed" / "final").exists()
    resumed = cli("train", "--config", cfg, "--out", tmp_path / "resumed", "--quiet", "--resume")
    assert "(step 2)" in resumed.stderr
    a, b = log_rows(tmp_path / "straight"), log_rows(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], (ra, rb)  # bit-identical losses after resuming
    wa = load_file(tmp_path / "straight" / "final" / "denoiser" / "model.safetensors")
    wb = load_file(tmp_path / "resumed" / "final" / "denoiser" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # guidance dropout happened with the reference rates (logged per step)
    assert all({"dropped_all", "dropped_prompt"} <= set(r) for r in a)
    # neighbour features were cached into the database once, under the pipeline's feature keys
    from reaudio_core.database import Database
    from reaudio_core.pipeline import feature_key
    full = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    names = Database.open(db_dir).feature_names()
    assert feature_key(full, "caption_encoder") in names and feature_key(full, "audio_encoder") in names


def test_ldm_conditions_come_from_the_neighbour_table(tmp_path, db_dir, vae_dir):
    """Training conditions: k neighbours per item from the table, never the item itself; full guidance
    dropout gives the stage's unconditional inputs (built by reaudio_core.conditioning, tests/test_conditioning.py)."""
    from reaudio_core.distributed import DistEnv
    cfg = compose(None, [ldm_yaml(tmp_path, db_dir, vae_dir, cfg_drop_all=1.0)])
    stage = T.LdmStage(cfg, DistEnv(), progress=False)
    pos = torch.tensor([0, 3])
    cond = stage.condition(pos)
    k = cfg["generation"]["k"]
    assert cond.captions.shape == (2, k * 8, 384) and cond.audio.shape == (2, k * 4, 128)
    # the item itself is never among its neighbours
    ids = stage.neighbour_ids[pos]
    assert all(int(stage.dataset.clips[p].index) not in ids[j].tolist() for j, p in enumerate(pos.tolist()))
    dropped, stats = stage.objective.dropout(cond, torch.Generator().manual_seed(0))
    assert stats["dropped_all"] == 1.0
    for f in ("prompt", "captions", "caption_mask", "audio", "audio_mask"):
        assert torch.equal(getattr(dropped, f), getattr(stage.uncond, f).expand_as(getattr(dropped, f))), f
    # the caches record the weights they were computed with (a retrained encoder is never served stale)
    from reaudio_core.conditioning import feature_key
    for slot in ("caption_encoder", "audio_encoder"):
        info = T.feature_info(stage.db, feature_key(cfg, slot))
        assert info["fingerprint"] == T.component_fingerprint(getattr(stage, slot))
    # the cached caption states equal the caption encoder's own output for the neighbours
    nb = ids[0].tolist()
    states, mask = stage.caption_encoder.encode_tokens([stage.db.items[i]["caption"] for i in nb], max_tokens=8)
    assert torch.allclose(cond.captions[0], states.reshape(-1, 384), atol=1e-5)
    assert torch.equal(cond.caption_mask[0], mask.reshape(-1))


def test_ldm_stage_trains_from_cached_text_features_without_the_text_encoder(tmp_path, db_dir, vae_dir,
                                                                             monkeypatch):
    """Where the text encoder's weights are not installed (a GPU box), the ldm stage uses the prompt
    embeddings, empty inputs and caption states cached in the database by an earlier run, and the
    conditions equal those of a run with the encoder; without such a cache it raises the encoder's error."""
    import reaudio_plugins.minilm as minilm
    from reaudio_core.distributed import DistEnv
    cfg = compose(None, [ldm_yaml(tmp_path, db_dir, vae_dir)])
    with_encoder = T.LdmStage(cfg, DistEnv(), progress=False)  # writes (or reuses) the caches
    pos = torch.tensor([0, 2, 5])
    ref = with_encoder.condition(pos)

    def missing():
        raise ReaudioError("MiniLM weights not installed")

    monkeypatch.setattr(minilm, "default_model_path", missing)
    stage = T.LdmStage(cfg, DistEnv(), progress=False)
    assert isinstance(stage.text_encoder, T.UnloadedTextEncoder) and stage.caption_encoder is stage.text_encoder
    got = stage.condition(pos)
    for f in ("prompt", "captions", "caption_mask", "audio", "audio_mask"):
        assert torch.equal(getattr(got, f), getattr(ref, f)), f
    for f in ("prompt", "captions", "caption_mask"):
        assert torch.equal(getattr(stage.uncond, f), getattr(with_encoder.uncond, f)), f
    # the cached prompt embeddings are the encoder's own
    clips = [stage.dataset.clips[i] for i in pos.tolist()]
    assert torch.allclose(ref.prompt, with_encoder.text_encoder.embed([c.caption for c in clips]), atol=1e-5)
    # a database without the cache: the encoder's own error
    other = dict(cfg, generation={**cfg["generation"], "caption_tokens": 7})
    with pytest.raises(ReaudioError, match="not installed"):
        T.LdmStage(other, DistEnv(), progress=False)


def test_neighbour_pool_draws_k_of_the_first_pool_neighbours_per_step(tmp_path, db_dir, vae_dir):
    """training.neighbour_pool > k: each item's k neighbours come from the first neighbour_pool columns of
    its table, best first, never itself, differ between steps and repeat for the same step seed."""
    from reaudio_core.distributed import DistEnv
    cfg = compose(None, [ldm_yaml(tmp_path, db_dir, vae_dir, neighbour_pool=4)])
    stage = T.LdmStage(cfg, DistEnv(), progress=False)
    k = cfg["generation"]["k"]
    table = np.asarray(stage.db.neighbours.ids)
    pos = torch.arange(len(stage.dataset))
    draws = []
    for step in range(12):
        torch.manual_seed(step)
        draws.append(stage.draw_neighbours(pos))
    torch.manual_seed(3)
    assert torch.equal(stage.draw_neighbours(pos), draws[3])
    for nb in draws:
        assert nb.shape == (len(pos), k)
        for j, p in enumerate(pos.tolist()):
            row = table[stage.dataset.clips[p].index, :4].tolist()
            assert set(nb[j].tolist()) <= set(row) and len(set(nb[j].tolist())) == k
            assert [row.index(i) for i in nb[j].tolist()] == sorted(row.index(i) for i in nb[j].tolist())
    assert len({tuple(nb[0].tolist()) for nb in draws}) > 1  # not always the same k
    # the condition uses the drawn ids; without a pool it is the table's first k, always
    fixed = T.LdmStage(compose(None, [ldm_yaml(tmp_path, db_dir, vae_dir)]), DistEnv(), progress=False)
    assert fixed.neighbour_pool is None
    with pytest.raises(T.ReaudioError, match="neighbour table width"):
        T.LdmStage(compose(None, [ldm_yaml(tmp_path, db_dir, vae_dir, neighbour_pool=9)]), DistEnv(), progress=False)


@pytest.mark.slow  # two torchrun processes
def test_ddp_two_cpu_processes_and_the_export_generates(tmp_path, db_dir, vae_dir):
    from reaudio_core.pipeline import ReAudioPipeline
    cfg = ldm_yaml(tmp_path, db_dir, vae_dir, max_steps=3, batch_size=1)
    proc = run([*TORCHRUN, "-m", "reaudio_core.cli", "train", "--config", str(cfg), "--out", str(tmp_path / "ddp"),
                "--quiet"])
    assert "trained ldm: steps 0 -> 3" in proc.stdout
    assert proc.stdout.count("trained ldm") == 1  # only rank 0 reports (and writes)
    state = T.load_checkpoint(T.list_checkpoints(tmp_path / "ddp")[-1][1])
    assert state["world_size"] == 2 and state["step"] == 3
    assert [r["step"] for r in log_rows(tmp_path / "ddp")] == [1, 2, 3]
    final = tmp_path / "ddp" / "final"
    assert {p.name for p in final.iterdir()} >= {"config.yaml", "denoiser", "decoder", "audio_encoder"}
    pipe = ReAudioPipeline.from_pretrained(final, db=db_dir)
    out = pipe("a dog barks", steps=2, progress=False)
    assert out.waveforms.shape == (1, 5120) and torch.isfinite(out.waveforms).all()


@pytest.mark.slow  # two torchrun processes
def test_distributed_index_build_equals_a_single_process_build(tmp_path, data, db_dir):
    from reaudio_core.database import Database
    args = [*TORCHRUN, "-m", "reaudio_core.cli", "index", "build", "--manifest", str(data / "bad.csv"),
            "--out", str(tmp_path / "db2"), "--quiet", "text_encoder=minilm", "retriever=torch", "database.neighbours=4"]
    proc = run(args, check=False)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr and "built " in proc.stdout:
        # seen once in about ten runs: a worker aborts in C++ teardown at interpreter exit, after the build was
        # written and reported (not understood yet; recorded in the stop note). The build itself is what this
        # test checks: run it once more into a fresh folder, strictly.
        args[args.index("--out") + 1] = str(tmp_path / "db3")
        proc = run(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_dir = Path(args[args.index("--out") + 1])
    assert proc.stdout.count("built ") == 1 and "3 skipped" in proc.stdout
    one, two = Database.open(db_dir), Database.open(two_dir)
    assert [(i["path"], i["caption"]) for i in one.items] == [(i["path"], i["caption"]) for i in two.items]
    assert np.allclose(one.embeddings("text"), two.embeddings("text"), atol=1e-5)
    assert np.array_equal(one.neighbours.ids, two.neighbours.ids)
    assert {Path(s["path"]).name for s in two.report()["skipped"]} == {"corrupt.flac", "truncated.wav", "gone.wav"}


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ldm_objective_target_follows_the_prediction_type(kind):
    """The LDM loss is the MSE to epsilon, or to v = sqrt(a) eps - sqrt(1 - a) x0 (computed here from the
    reference betas, independently of diffusers); the samplers are built with the same parameterisation."""
    from diffusers import DDPMScheduler
    from reaudio_core.interfaces import Conditioning
    from reaudio_core.pipeline import make_scheduler

    class Zero(torch.nn.Module):  # predicts 0: the loss is then the mean square of the target
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, latents, t, cond):
            return latents * self.w

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                          beta_schedule="scaled_linear", prediction_type=kind)
    uncond = Conditioning(prompt=torch.zeros(1, 4))
    obj = T.LdmObjective(Zero(), sched, uncond, drop_all=0.0, drop_prompt=0.0)
    x0 = torch.randn(3, 8, 16, 4, generator=torch.Generator().manual_seed(1)) * 2 + 1
    loss = obj({"latents": x0, "cond": Conditioning(prompt=torch.ones(3, 4))}, seed=5)["loss"]
    g = torch.Generator().manual_seed(5)  # the objective's draws, in its order
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    a = torch.cumprod(1 - torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)[t]
    a = a.float().view(3, 1, 1, 1)
    target = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(loss, (target ** 2).mean(), rtol=1e-4)
    cfg = {"diffusion": {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
                         "beta_schedule": "scaled_linear", "prediction_type": kind}}
    for sampler in ("ddim", "dpm-solver"):
        assert make_scheduler(cfg, sampler).config.prediction_type == kind
    cfg["diffusion"]["prediction_type"] = "sample"
    with pytest.raises(ReaudioError, match="prediction_type"):
        make_scheduler(cfg, "ddim")


def test_training_timesteps_draws_only_from_the_range():
    """training.timesteps [lo, hi]: every timestep the LDM objective trains on lies in [lo, hi) (a low-noise
    expert, plugins/experts.py); bad ranges are refused with the key's name."""
    from diffusers import DDPMScheduler
    from reaudio_core.interfaces import Conditioning

    seen = []

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, latents, t, cond):
            seen.append(t.clone())
            return latents * self.w

    sched = DDPMScheduler(num_train_timesteps=1000)
    rng = T.timestep_range([0, 400], 1000)
    obj = T.LdmObjective(Record(), sched, Conditioning(prompt=torch.zeros(1, 4)), 0.0, 0.0, rng)
    for seed in range(20):
        obj({"latents": torch.randn(16, 8, 4, 4), "cond": Conditioning(prompt=torch.ones(16, 4))}, seed=seed)
    t = torch.cat(seen)
    assert t.min() >= 0 and t.max() < 400 and t.max() > 300  # 320 draws spread over the range
    assert T.timestep_range(None, 1000) is None
    for bad in ([400, 400], [-1, 10], [0, 1001], [0.0, 10], "0,400", [1, 2, 3]):
        with pytest.raises(ReaudioError, match="training.timesteps"):
            T.timestep_range(bad, 1000)
