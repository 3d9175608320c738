"""Smoke test of benchmarks/generation/ (--quick, through `reaudio bench generation`) and its argument checks."""
import json
import math

import pytest

from reaudio_core.cli import main as cli


@pytest.fixture(scope="module")
def bench():
    """benchmarks/generation/, the module `reaudio bench generation` imports."""
    import benchmarks.generation
    return benchmarks.generation


def table(markdown: str, heading: str) -> list[dict]:
    """Rows of the first markdown table after ``heading``."""
    section = markdown.split(heading, 1)[1]
    lines = []
    for line in section.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[1:] if not line.startswith("|---")]


@pytest.mark.slow  # the generation benchmark end to end
def test_quick_benchmark_prints_every_table(tmp_path, capsys):
    out = tmp_path / "results"
    assert cli(["bench", "generation", "--quick", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "generation.md").read_text()
    assert text.strip() in printed
    assert "random" in text and "MiniLM" in text  # the stand-ins are stated

    stages = table(text, "## Time per stage")
    labels = [r["stage"] for r in stages]
    for expected in ("prompt encoder", "retrieval", "caption encoder", "UNet per step", "VAE decode", "vocoder",
                     "**end to end**", "peak RSS", "audio encoder"):
        assert any(label.startswith(expected) or expected in label for label in labels), expected
    assert {r["size"] for r in stages} == {"tiny"}
    end = next(r for r in stages if "end to end" in r["stage"])
    assert float(end["seconds"].strip("*")) > 0

    loop = table(text, "## Denoising loop")
    assert len(loop) == 1 and loop[0]["steps"] == "2"
    ratio = float(loop[0]["ratio"])
    assert math.isfinite(ratio) and ratio > 0
    assert float(loop[0]["pipeline s"]) > 0 and float(loop[0]["bare diffusers s"]) > 0

    guidance = table(text, "## Classifier-free guidance")
    assert [r["guidance"].split(" (")[0] for r in guidance] == ["batched", "two UNet calls on B"]
    samplers = table(text, "## Samplers")
    assert [(r["sampler"], r["steps"]) for r in samplers] == [("dpm-solver", "2"), ("ddim", "4"),
                                                               ("ddim (reference)", "8")]
    precision = table(text, "## Precision")
    assert [r["precision"] for r in precision] == ["fp32", "bf16 UNet", "bf16 UNet+VAE+vocoder"]
    assert all(math.isfinite(float(r["mel max abs diff vs fp32"])) for r in precision[1:])
    sweep = table(text, "## Steps sweep")
    assert [r["DPM-Solver steps"] for r in sweep] == ["1", "2"]
    assert "which this run did not include" in text.split("## Target", 1)[1]

    result = json.loads((out / "generation.json").read_text())
    tiny = result["results"][0]
    # the bare diffusers loop runs the same weights on the same inputs: the same latents
    assert tiny["loop"]["vs_bare"]["max_abs"] < 1e-5
    assert tiny["guidance"]["vs_batched"]["max_abs"] < 1e-2
    assert tiny["e2e"]["unet_calls"] == 2 and tiny["e2e"]["peak_rss_gb"] > 0
    assert (out / "generation.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [["--sizes", "xl"], ["--steps", "0"], ["--steps", "a,b"], ["--sampler-steps", "20"],
                                  ["--repeats", "-1"], ["--duration", "-1"]])
def test_bad_arguments_are_refused(bench, argv, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_quick_defaults(bench):
    args = bench.parse_args(["--quick"])
    assert args.sizes == ["tiny"] and args.target_steps == 2 and args.repeats == 1 and args.threads == 2
    full = bench.parse_args([])
    assert full.sizes == ["tiny", "s"] and full.target_steps == 20 and full.sampler_steps == [20, 50, 200]


@pytest.mark.slow  # three pipelines end to end
def test_student_section_counts_one_call_per_step(tmp_path, capsys):
    out = tmp_path / "results"
    assert cli(["bench", "generation", "--student", "--quick", "--threads", "1", "--out", str(out)]) == 0
    text = (out / "generation-student.md").read_text()
    rows = table(text, "## Teacher against distilled student")
    assert [(r["variant"].split(":")[0], r["UNet calls"]) for r in rows] == [("teacher", "2"), ("student", "4"),
                                                                            ("student", "8")]
    assert all(float(r["end to end (median)"]) > 0 for r in rows)
    result = json.loads((out / "generation-student.json").read_text())
    assert [r["steps"] for r in result["results"][0]["rows"]] == [2, 4, 8]
    assert not (out / "generation.md").exists()  # the full benchmark's report is left alone
