"""Smoke test of benchmarks/retrievers/ (--quick, through `reaudio bench retrievers`) and its recall rule."""
import json

import numpy as np
import pytest

from reaudio_core.cli import main as cli
from reaudio_core.registry import get_registry


@pytest.fixture(scope="module")
def bench():
    """benchmarks/retrievers/, the module `reaudio bench retrievers` imports."""
    import benchmarks.retrievers
    return benchmarks.retrievers


def table_rows(markdown: str) -> list[dict]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[1:] if not line.startswith("|---")]


@pytest.mark.slow  # the retriever benchmark end to end
def test_quick_benchmark_reports_every_retriever(tmp_path, capsys):
    out = tmp_path / "results"
    code = cli(["bench", "retrievers", "--quick", "--datasets", "synthetic", "--synthetic-size", "3000",
                "--queries", "50", "--time-per-setting", "0.05", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    text = (out / "retrievers.md").read_text()
    assert text.strip() in printed
    rows = table_rows(text.split("## Memory bandwidth")[0])
    result = json.loads((out / "retrievers.json").read_text())
    assert {r["retriever"] for r in result["rows"]} == set(get_registry().names("retriever"))
    families = {r["retriever"] for r in rows}
    assert {"torch", "faiss flat", "faiss ivf", "faiss hnsw", "hnswlib"} <= families
    exact = [r for r in rows if r["setting"] == "exact"]
    assert {r["retriever"] for r in exact} == {"torch", "faiss flat"}
    assert all(r["recall@1"] == r["recall@10"] == "1.0000" for r in exact)
    assert all(0 <= float(r["recall@10"]) <= 1 and float(r["QPS 1-query"].replace(",", "")) > 0 for r in rows)
    assert "Measured read bandwidth" in text and "## Targets" in text
    assert (out / "retrievers.png").stat().st_size > 1000


def test_recall_counts_ties_with_the_kth_exact_score_as_hits(bench):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[10:20] = x[10]  # ten identical vectors
    q = x[10:11] + 0.01 * rng.standard_normal((1, 8)).astype(np.float32)
    truth = bench.Truth(x, q, k=3)
    assert set(truth.ids[0]) <= set(range(10, 20))
    other_copies = np.array([[19, 18, 17]])  # not the exact answer's ids, but tied with it
    assert truth.recall(other_copies) == (1.0, 1.0)
    one_wrong = np.array([[19, 18, 0]])
    r1, r3 = truth.recall(one_wrong)
    assert r1 == 1.0 and r3 == pytest.approx(2 / 3)
    assert truth.recall(np.array([[-1, -1, -1]])) == (0.0, 0.0)


@pytest.mark.slow  # a published-size model or a subprocess: seconds
def test_audiocaps_embeddings_are_computed_once_and_cached(bench, tmp_path):
    root = tmp_path / "audiocaps"
    root.mkdir()
    header = "audiocap_id,youtube_id,start_time,caption\n"
    (root / "train.csv").write_text(header + "".join(f"{i},y{i},0,{c}\n" for i, c in enumerate(
        ["a dog barks", "rain falls on a roof", "a dog barks", "an engine idles"])))
    (root / "test.csv").write_text(header + "9,y9,0,a dog is barking\n")
    ds = bench.audiocaps(root, tmp_path / "cache", None, None)
    assert ds.x.shape == (4, 384) and ds.q.shape == (1, 384)
    np.testing.assert_array_equal(ds.x[0], ds.x[2])  # repeated captions embed identically (they tie)
    assert "3 distinct" in ds.description
    cached = list((tmp_path / "cache").glob("audiocaps-minilm-*.npz"))
    assert len(cached) == 1
    again = bench.audiocaps(root, tmp_path / "cache", None, None)
    np.testing.assert_array_equal(again.x, ds.x)
    (root / "test.csv").write_text(header + "9,y9,0,thunder\n")  # new content -> new cache entry
    bench.audiocaps(root, tmp_path / "cache", None, None)
    assert len(list((tmp_path / "cache").glob("audiocaps-minilm-*.npz"))) == 2
