"""The neighbour memory: who has a say, how much, what survives a save, and where it applies."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from orchestrator.predictor.adapt import (
    MEMORY_FILE_PREFIX,
    MEMORY_MAX_RECORDS,
    AdaptationData,
    adapt_records,
    fit_calibration,
)
from orchestrator.predictor.data import LengthRecord
from orchestrator.predictor.errors import PredictorModelError
from orchestrator.predictor.features import N_CUE_FEATURES
from orchestrator.predictor.memory import (
    MEMORY_FILE,
    NEIGHBOURS,
    PRIOR_WEIGHT,
    SIMILARITY_FILE,
    SIMILARITY_FLOOR,
    NeighbourMemory,
)
from orchestrator.predictor.model import (
    ADAPTATION_FILE,
    ENCODER_FILE,
    HEAD_FILE,
    METADATA_FILE,
    TOKENIZER_FILE,
    LengthPredictor,
    shipped_model_dir,
)
from orchestrator.predictor.train import group_records, write_memory

DIM = 8


def axis(i: int, dim: int = DIM) -> np.ndarray:
    """A unit vector along axis i: orthogonal to every other axis."""
    vec = np.zeros(dim, dtype=np.float32)
    vec[i] = 1.0
    return vec


def tilted(i: int, j: int, similarity: float) -> np.ndarray:
    """A unit vector at cosine ``similarity`` to axis i, turned towards axis j."""
    return similarity * axis(i) + np.sqrt(1.0 - similarity**2) * axis(j)


def test_an_exact_duplicate_moves_half_way_to_its_residual() -> None:
    memory = NeighbourMemory.of(np.stack([axis(0), axis(1)]), np.asarray([0.8, -2.0]))
    shift = memory.correction(np.stack([axis(0) * 3.0]))  # the norm does not matter
    assert shift[0] == pytest.approx(0.8 * 1.0 / (1.0 + PRIOR_WEIGHT))


def test_prompts_at_or_below_the_floor_have_no_say() -> None:
    memory = NeighbourMemory.of(np.stack([axis(0)]), np.asarray([1.5]))
    far = np.stack([tilted(0, 1, SIMILARITY_FLOOR - 0.01), axis(2)])
    assert memory.correction(far) == pytest.approx([0.0, 0.0])


def test_closer_neighbours_weigh_more() -> None:
    memory = NeighbourMemory.of(
        np.stack([tilted(0, 1, 0.99), tilted(0, 2, 0.8)]), np.asarray([1.0, -1.0])
    )
    shift = memory.correction(np.stack([axis(0)]))[0]
    near, far = ((0.99 - SIMILARITY_FLOOR) / 0.3) ** 2, ((0.8 - SIMILARITY_FLOOR) / 0.3) ** 2
    assert shift == pytest.approx((near - far) / (near + far + PRIOR_WEIGHT), rel=1e-4)
    assert shift > 0


def test_only_the_nearest_neighbours_count() -> None:
    close = [tilted(0, 1, 0.95)] * NEIGHBOURS
    memory = NeighbourMemory.of(
        np.stack([*close, tilted(0, 2, 0.9)]), np.asarray([0.0] * NEIGHBOURS + [5.0])
    )
    assert memory.correction(np.stack([axis(0)]))[0] == pytest.approx(0.0)


def test_many_queries_agree_with_one_at_a_time() -> None:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, DIM))
    memory = NeighbourMemory.of(keys, rng.standard_normal(300))
    queries = keys[:150] + 0.1 * rng.standard_normal((150, DIM))
    together = memory.correction(queries)
    alone = [memory.correction(q[None, :])[0] for q in queries]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert np.count_nonzero(together) > 100


def test_an_empty_memory_or_batch_changes_nothing() -> None:
    empty = NeighbourMemory.of(np.zeros((0, DIM)), np.zeros(0))
    assert empty.correction(np.stack([axis(0)])) == pytest.approx([0.0])
    one = NeighbourMemory.of(np.stack([axis(0)]), np.asarray([1.0]))
    assert one.correction(np.zeros((0, DIM))).shape == (0,)


def test_a_saved_memory_loads_back_and_saves_the_same_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    memory = NeighbourMemory.of(rng.standard_normal((40, DIM)), rng.standard_normal(40))
    memory.save(tmp_path / "a.npy")
    loaded = NeighbourMemory.load(tmp_path / "a.npy")
    query = rng.standard_normal((5, DIM))
    np.testing.assert_allclose(loaded.correction(query), memory.correction(query), atol=2e-3)
    loaded.save(tmp_path / "b.npy")
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_a_file_that_is_not_a_memory_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    with pytest.raises(PredictorModelError, match="unreadable"):
        NeighbourMemory.load(tmp_path / "garbage.npy")
    np.save(tmp_path / "flat.npy", np.zeros(7, dtype=np.float16))
    with pytest.raises(PredictorModelError, match="shape"):
        NeighbourMemory.load(tmp_path / "flat.npy")


def adaptation_data(n: int, embeddings: np.ndarray, target: np.ndarray) -> AdaptationData:
    cues = np.zeros((n, N_CUE_FEATURES))
    return AdaptationData(
        loc=np.full(n, 4.0),
        features=np.hstack([embeddings, cues]),
        base_offsets=np.zeros(100),
        target=target,
    )


def test_a_calibration_remembers_its_newest_records_residuals() -> None:
    n = MEMORY_MAX_RECORDS + 10
    rng = np.random.default_rng(2)
    embeddings = rng.standard_normal((n, DIM))
    target = 4.0 + rng.standard_normal(n)
    calibration = fit_calibration(adaptation_data(n, embeddings, target))
    assert calibration.memory is not None
    assert len(calibration.memory.keys) == MEMORY_MAX_RECORDS
    newest = embeddings[-1] / np.linalg.norm(embeddings[-1])
    np.testing.assert_allclose(calibration.memory.keys[-1], newest, rtol=1e-5)


def test_no_features_no_memory() -> None:
    data = AdaptationData(
        loc=np.full(30, 4.0), features=None, base_offsets=np.zeros(100), target=np.full(30, 5.0)
    )
    assert fit_calibration(data).memory is None


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return LengthPredictor.load()


def test_the_shipped_model_carries_a_memory_the_parity_path_can_skip(
    predictor: LengthPredictor,
) -> None:
    assert predictor.memory is not None and len(predictor.memory.keys) > 1000
    prompts = ["Write a haiku about rain.", "List ten uses of a paperclip."]
    with_memory = predictor.raw_outputs(prompts).log_grid
    without = predictor.raw_outputs(prompts, with_memory=False).log_grid
    shift = predictor.memory.correction(predictor.raw_outputs(prompts).embeddings)
    np.testing.assert_allclose(with_memory[:, 50] - without[:, 50], shift, atol=1e-4)


def test_an_adapted_prompt_served_again_moves_towards_its_own_answer(
    predictor: LengthPredictor, tmp_path: Path
) -> None:
    words = ["cello", "piano", "flute", "drums", "harp"] * 8
    prompts = [f"Give me {i} reasons to learn the {word}." for i, word in enumerate(words)]
    long_one = "Describe, step by step, how to restore an antique oak writing desk."
    records = [LengthRecord(p, 60, model="m") for p in prompts]
    records.append(LengthRecord(long_one, 2000, model="m"))
    out = tmp_path / "adapted"
    summary = adapt_records(records, out, predictor)
    assert summary["calibrations"]["m"]["memory_records"] == len(records)
    doc = json.loads((out / ADAPTATION_FILE).read_text())
    files = {c["memory"] for c in doc["calibrations"].values()}
    assert len(files) == 1 and all(f.startswith(MEMORY_FILE_PREFIX) for f in files)
    adapted = LengthPredictor.load(out)
    calibration = adapted.calibrations["m"]
    assert calibration.memory is not None
    moved = adapted.predict(long_one, "m").quantiles[0.5]
    adapted.calibrations["m"] = dataclasses.replace(calibration, memory=None)
    unmoved = adapted.predict(long_one, "m").quantiles[0.5]
    assert moved > 1.5 * unmoved
    # Adapting again in place replaces the memory file and removes the old one.
    adapt_records(records, out, predictor)
    assert [p.name for p in out.glob(f"{MEMORY_FILE_PREFIX}*")] != list(files)
    assert len(list(out.glob(f"{MEMORY_FILE_PREFIX}*"))) == 1


def test_an_adaptation_naming_a_missing_memory_is_a_typed_error(
    predictor: LengthPredictor, tmp_path: Path
) -> None:
    out = tmp_path / "adapted"
    adapt_records([LengthRecord(f"Say hello {i} times.", 5 + i) for i in range(30)], out)
    for stale in out.glob(f"{MEMORY_FILE_PREFIX}*"):
        stale.unlink()
    with pytest.raises(PredictorModelError, match="memory"):
        LengthPredictor.load(out)


def test_training_stores_the_exported_models_residual_on_each_prompt(tmp_path: Path) -> None:
    shipped = shipped_model_dir()
    for name in (ENCODER_FILE, HEAD_FILE, TOKENIZER_FILE, METADATA_FILE):
        shutil.copyfile(shipped / name, tmp_path / name)
    metadata = json.loads((tmp_path / METADATA_FILE).read_text())
    records = [
        LengthRecord("Name a colour.", 3, source="s"),
        LengthRecord("Write a long story about a lighthouse keeper.", 900, source="s"),
    ]
    data = group_records(records)
    entry = write_memory(tmp_path, metadata, data)
    assert entry == {"file": MEMORY_FILE, "prompts": 2}
    memory = NeighbourMemory.load(tmp_path / MEMORY_FILE)
    bare = {k: v for k, v in metadata.items() if k != "memory"}
    raw = LengthPredictor(tmp_path, bare).raw_outputs(data.prompts)
    np.testing.assert_allclose(memory.residuals, data.log_tokens - raw.log_grid[:, 50], atol=0.01)


def test_a_memory_of_another_embedding_width_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "adapted"
    adapt_records([LengthRecord(f"Say hello {i} times.", 5 + i) for i in range(30)], out)
    (name,) = [p.name for p in out.glob(f"{MEMORY_FILE_PREFIX}*")]
    NeighbourMemory.of(np.stack([axis(0)]), np.asarray([1.0])).save(out / name)
    with pytest.raises(PredictorModelError, match="8-wide"):
        LengthPredictor.load(out)


def model_copy(folder: Path, metadata_change: dict[str, object]) -> Path:
    """The shipped model's files linked into ``folder``, metadata.json changed."""
    shipped = shipped_model_dir()
    for name in (ENCODER_FILE, HEAD_FILE, TOKENIZER_FILE, MEMORY_FILE, SIMILARITY_FILE):
        (folder / name).symlink_to(shipped / name)
    metadata = json.loads((shipped / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps({**metadata, **metadata_change}))
    return folder


def test_a_model_without_its_similarity_graph_is_a_typed_error(tmp_path: Path) -> None:
    folder = model_copy(tmp_path, {})
    (folder / SIMILARITY_FILE).unlink()
    with pytest.raises(PredictorModelError, match=SIMILARITY_FILE):
        LengthPredictor.load(folder)


@pytest.mark.parametrize("memory", [[], {"file": MEMORY_FILE}, {"file": 3, "similarity": "x"}])
def test_a_malformed_memory_entry_is_a_typed_error(tmp_path: Path, memory: object) -> None:
    with pytest.raises(PredictorModelError, match="bad 'memory'"):
        LengthPredictor.load(model_copy(tmp_path, {"memory": memory}))
