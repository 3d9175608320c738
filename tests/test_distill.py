"""`reaudio distill`: a few-step, guidance-distilled student on the training machinery (tiny teacher).

The teacher is a tiny retrieval LDM trained for two steps on six synthetic clips (tests/test_training.py's
fixtures); what is checked is the machinery and the maths, not the quality (docs/results.md measures that on
the shipped preset)."""
import dataclasses
import json
import sys

import pytest
import torch

from reaudio_core import ReaudioError, create
from reaudio_core import training as T
from reaudio_core.config import compose
from reaudio_core.interfaces import Conditioning
from test_training import TORCHRUN, cli, data, db_dir, ldm_yaml, log_rows, one_thread, run, vae_dir  # noqa: F401

FAST = ["training.batch_size=2", "training.log_every=1", "training.checkpoint_every=2", "training.threads=1",
        "training.crop_seconds=0.32", "training.warmup_steps=1", "training.distill_steps=2",
        "training.distill_substeps=2", "training.ema_decay=0.9"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, db_dir, vae_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("teacher")
    T.train(compose(None, [ldm_yaml(tmp, db_dir, vae_dir, max_steps=2)]), tmp / "run", progress=False)
    return tmp / "run" / "final"


def test_distill_trains_a_one_call_student_that_generates(tmp_path, teacher, db_dir):  # noqa: F811
    from reaudio_core.database import Database
    from reaudio_core.pipeline import ReAudioPipeline
    before = set(Database.open(db_dir).feature_names())
    T.train(T.distill_config(str(teacher), [], [*FAST, "training.max_steps=3"]), tmp_path / "s", progress=False)
    assert [r["step"] for r in log_rows(tmp_path / "s")] == [1, 2, 3]
    assert set(Database.open(db_dir).feature_names()) == before  # caches went into OUT/db, not the teacher's
    pipe = ReAudioPipeline.from_pretrained(tmp_path / "s" / "final")
    gen = pipe.cfg["generation"]
    assert (gen["sampler"], gen["steps"], pipe.denoiser.guidance_input) == ("ddim-trailing", 2, True)
    assert pipe.cfg["denoiser"]["params"]["guidance_embedding"] == 256
    calls = []
    inner = pipe.denoiser

    class Counting:
        def __getattr__(self, name):
            return getattr(inner, name)

        def __call__(self, x, t, cond):
            calls.append((len(x), cond.guidance.tolist()))
            return inner(x, t, cond)

    pipe.denoiser = Counting()
    out = pipe("a dog barks", guidance=3.0, progress=False)
    assert calls == [(1, [3.0]), (1, [3.0])]  # one batch-1 call per step, the scale as its input
    assert out.waveforms.shape == (1, 5120) and torch.isfinite(out.waveforms).all()


def test_a_fresh_student_computes_the_teachers_conditional_output(teacher):
    """Zero guidance projection: before training the student is the teacher's conditional model, for any w."""
    teacher_unet = create("denoiser", "unet-ldm", checkpoint=str(teacher / "denoiser"),
                          **{k: v for k, v in json.loads((teacher / "denoiser" / "config.json").read_text()).items()
                             if k not in ("checkpoint",)})
    entry = T.student_entry("unet-ldm", teacher / "denoiser", 64)
    student = create("denoiser", entry["name"], **entry["params"])
    assert student.guidance_input and not teacher_unet.guidance_input
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 16, generator=g)
    cond = Conditioning(prompt=torch.randn(2, 384, generator=g), captions=torch.randn(2, 16, 384, generator=g),
                        caption_mask=torch.ones(2, 16, dtype=torch.bool), audio=torch.randn(2, 8, 128, generator=g),
                        audio_mask=torch.ones(2, 8, dtype=torch.bool))
    t = torch.tensor([999, 10])
    want = teacher_unet(x, t, cond)
    for w in (1.0, 7.5):
        got = student(x, t, dataclasses.replace(cond, guidance=torch.full((2,), w)))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ReaudioError, match="guidance-distilled"):
        student(x, t, cond)
    with pytest.raises(ReaudioError, match="guidance_embedding must be an even integer"):
        create("denoiser", "unet-ldm", size="tiny", prompt_dim=16, text_dim=None, audio_dim=None, guidance_embedding=3)


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_the_target_is_exact_for_an_exact_teacher(kind):
    """A teacher that knows x0 (one data point) moves along the exact ODE path, whatever its substeps and
    guidance: the x0 the student is trained to give must then be that x0, at every grid time."""
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    ab = torch.cat([sched.alphas_cumprod.float(), torch.ones(1)])
    x0 = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(1))

    def exact(x, t, cond):
        a = ab[t].view(-1, 1, 1, 1)
        ref = torch.cat([x0, x0]) if len(x) == 2 * len(x0) else x0
        eps = (x - a.sqrt() * ref) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * ref if kind == "v_prediction" else eps

    grid = T.distill.grid({"diffusion": {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
                                         "beta_schedule": "scaled_linear", "prediction_type": kind}}, 4)
    assert grid == [999, 749, 499, 249, -1]
    obj = T.DistillObjective(create("denoiser", "unet-ldm", size="tiny", prompt_dim=4, text_dim=None, audio_dim=None,
                                    in_channels=8),
                             exact, sched.alphas_cumprod, Conditioning(prompt=torch.zeros(1, 4)), grid, 3, (2.0, 8.0),
                             kind)
    cond = Conditioning(prompt=torch.zeros(3, 4))
    for i in range(4):
        t, s = torch.full((3,), grid[i]), torch.full((3,), grid[i + 1])
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape)
        got = obj.x0_target(x_t, t, s, cond, cond, torch.tensor([2.0, 5.0, 8.0]))
        torch.testing.assert_close(got, x0, rtol=0, atol=2e-3 if i == 0 else 1e-4)


@pytest.mark.slow  # two CLI processes, one killed
def test_resume_continues_the_distillation_bit_for_bit(tmp_path, teacher):
    cfg = T.distill_config(str(teacher), [], [*FAST, "training.max_steps=4"])
    T.train(cfg, tmp_path / "straight", progress=False)
    killed = cli("distill", "--teacher", teacher, "--out", tmp_path / "resumed", "--quiet", *FAST,
                 "training.max_steps=4", env_extra={T.KILL_HOOK: "3"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    cli("distill", "--teacher", teacher, "--out", tmp_path / "resumed", "--quiet", "--resume", *FAST,
        "training.max_steps=4")
    a, b = log_rows(tmp_path / "straight"), log_rows(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_a_student_continues_from_a_saved_student(tmp_path, teacher):
    """training.student_init: the new student starts as that student (here with lr 0 it stays it), on its own
    grid; a folder that is not a student of this teacher is refused."""
    from safetensors.torch import load_file
    T.train(T.distill_config(str(teacher), [], [*FAST, "training.max_steps=2"]), tmp_path / "four", progress=False)
    first = load_file(tmp_path / "four" / "final" / "denoiser" / "model.safetensors")
    assert first["time_embedding.cond_proj.weight"].abs().max() > 0  # trained: not the teacher's zero projection
    T.train(T.distill_config(str(teacher), [], [*FAST, "training.max_steps=1", "training.lr=0",
                                                 "training.distill_steps=3",
                                                 f"training.student_init={tmp_path / 'four' / 'final'}"]),
            tmp_path / "three", progress=False)
    second = load_file(tmp_path / "three" / "final" / "denoiser" / "model.safetensors")
    assert second.keys() == first.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ReaudioError, match="not a student of this teacher"):
        T.train(T.distill_config(str(teacher), [], [*FAST, "training.max_steps=1",
                                                     f"training.student_init={teacher}"]), tmp_path / "x", progress=False)


@pytest.mark.slow  # CLI processes that load the teacher
def test_distill_refuses_what_it_cannot_do(tmp_path, teacher):
    bad = cli("distill", "--teacher", tmp_path / "nothing", "--out", tmp_path / "o", check=False)
    assert bad.returncode != 0 and "no saved pipeline there" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("distill", "--teacher", teacher, "--out", tmp_path / "o2", "training.distill_guidance=[8, 2]", check=False)
    assert bad.returncode != 0 and "training.distill_guidance" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(ReaudioError, match="use `reaudio train`"):
        T.distill_config(str(teacher), [], ["training.stage=ldm"])


@pytest.mark.slow  # two torchrun processes
def test_distill_under_ddp(tmp_path, teacher):
    proc = run([*TORCHRUN, "-m", "reaudio_core.cli", "distill", "--teacher", str(teacher), "--out",
                str(tmp_path / "ddp"), "--quiet", *FAST, "training.batch_size=1", "training.max_steps=2"])
    assert proc.stdout.count("trained distill: steps 0 -> 2") == 1
    state = T.load_checkpoint(T.list_checkpoints(tmp_path / "ddp")[-1][1])
    assert state["world_size"] == 2 and (tmp_path / "ddp" / "final" / "denoiser").is_dir()


def test_cli_lists_distill():
    out = run([sys.executable, "-m", "reaudio_core.cli", "distill", "--help"])
    assert "--teacher" in out.stdout and "--out" in out.stdout
