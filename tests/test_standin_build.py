"""Stand-in builds in worker processes: the split on the cost table, the parallel and the sequential path, a worker
that raises and one that is killed (tiny recipe, real generator)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from consisid_lab.encoders import store
from consisid_lab.encoders.store import (
    BUILD_COSTS,
    BUILD_WORKERS_ENV,
    ENTRIES,
    FAULT_ENV,
    MIN_PARALLEL_SAVING_S,
    POOL_COSTS,
    Recipes,
    build_workers,
    default_generator_config,
    default_specs,
    entry_key,
    estimated_costs,
    group_cost,
    load_standins,
    split_entries,
)
from consisid_lab.encoders.training import Recipe

POOLS = {name: spec.pool for name, spec in default_specs().items()}
FIXED_TABLE_GROUPS = [["identity_net", "evaluator_low", "evaluator_high"], ["clip", "codec", "face_gate"]]
# A fixed cost table, so the split's tests do not move when the measured table is updated.
COSTS = {
    "identity_net": 87.0,
    "clip": 76.0,
    "evaluator_low": 66.0,
    "evaluator_high": 131.0,
    "codec": 179.0,
    "face_gate": 28.0,
}
POOL_C = {"encoder": 20.0, "evaluator": 22.0, "clips": 0.0}


# --- the split ---------------------------------------------------------------------------------------


def test_split_balances_the_cost_table() -> None:
    groups = split_entries(list(ENTRIES), POOLS, 2, COSTS, POOL_C)
    assert groups == FIXED_TABLE_GROUPS
    spans = [group_cost(g, POOLS, COSTS, POOL_C) for g in groups]
    # Both groups render both face pools (20 s + 22 s): 609 s of work in one process, 326 s in the longer of two.
    assert spans == [326.0, 325.0]
    assert group_cost(ENTRIES, POOLS, COSTS, POOL_C) == 609.0
    by_hand = [["codec", "identity_net"], ["clip", "evaluator_low", "evaluator_high", "face_gate"]]
    assert max(spans) <= max(group_cost(g, POOLS, COSTS, POOL_C) for g in by_hand) == 343.0
    for size in range(1, len(ENTRIES)):  # no split into two does better
        for first in itertools.combinations(ENTRIES, size):
            second = [n for n in ENTRIES if n not in first]
            assert max(group_cost(first, POOLS, COSTS, POOL_C), group_cost(second, POOLS, COSTS, POOL_C)) >= max(spans)


def test_split_edge_cases() -> None:
    assert split_entries(list(ENTRIES), POOLS, 1, COSTS, POOL_C) == [list(ENTRIES)]
    assert split_entries(["clip", "codec"], POOLS, 2, COSTS, POOL_C) == [["codec"], ["clip"]]
    assert split_entries([], POOLS, 2) == []
    many = split_entries(list(ENTRIES), POOLS, 10, COSTS, POOL_C)
    assert (
        sorted(n for g in many for n in g) == sorted(ENTRIES)
        and max(group_cost(g, POOLS, COSTS, POOL_C) for g in many) == 179.0
    )
    with pytest.raises(ValueError, match="BUILD_COSTS"):
        split_entries(["clip", "mystery"], {**POOLS, "mystery": "encoder"}, 2)
    with pytest.raises(ValueError, match="groups=0"):
        split_entries(["clip"], POOLS, 0)


def test_estimated_costs_scale_the_table_to_the_recipe() -> None:
    specs = default_specs()
    assert estimated_costs(specs, Recipes.named(Recipe())) == (BUILD_COSTS, POOL_COSTS)
    costs, pool_costs = estimated_costs(specs, Recipes.named(Recipe.tiny()))
    assert costs["identity_net"] == pytest.approx(BUILD_COSTS["identity_net"] * 3 / 200)
    assert pool_costs["encoder"] == pytest.approx(POOL_COSTS["encoder"] * (8 * 2 * 2) / (400 * 8 * 2))
    # A tiny build takes seconds: workers would not pay for their start-up, so none are started unasked.
    groups = split_entries(list(ENTRIES), POOLS, 2, costs, pool_costs)
    saving = group_cost(ENTRIES, POOLS, costs, pool_costs) - max(
        group_cost(g, POOLS, costs, pool_costs) for g in groups
    )
    assert saving < MIN_PARALLEL_SAVING_S


def test_build_workers_reads_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(BUILD_WORKERS_ENV, raising=False)
    monkeypatch.setattr(store.os, "cpu_count", lambda: 2)
    assert build_workers() == 2
    monkeypatch.setattr(store.os, "cpu_count", lambda: 1)
    assert build_workers() == 1
    monkeypatch.setenv(BUILD_WORKERS_ENV, "3")
    assert build_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(BUILD_WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=f"{BUILD_WORKERS_ENV}='{bad}' is not a positive integer"):
            build_workers()


# --- builds ------------------------------------------------------------------------------------------


def _keys() -> dict[str, str]:
    recipes = Recipes.named(Recipe.tiny())
    generator = default_generator_config()
    return {n: entry_key(n, s, recipes.for_kind(s.kind), generator) for n, s in default_specs().items()}


def _cached(cache: Path) -> list[str]:
    """Entries of the tiny recipe that load from ``cache`` with the current key."""
    keys, specs = _keys(), default_specs()
    return [n for n in ENTRIES if not isinstance(store.load_entry(specs[n], cache / "tiny" / n, keys[n]), str)]


@pytest.fixture(scope="module")
def parallel_build(tmp_path_factory):
    """A tiny build in two worker processes, with the log records it emitted in this process."""
    pytest.importorskip("consisid_lab.data.synthetic")
    cache = tmp_path_factory.mktemp("parallel")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("consisid_lab")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(BUILD_WORKERS_ENV, "2")
        mp.delenv(FAULT_ENV, raising=False)
        try:
            standins = load_standins(cache, recipe=Recipe.tiny())
        finally:
            logger.removeHandler(handler)
            logger.setLevel(previous)
    return cache, standins, [r.getMessage() for r in records]


def test_parallel_build_saves_and_returns_every_entry(parallel_build) -> None:
    cache, s, messages = parallel_build
    assert sorted(s.rebuilt) == sorted(ENTRIES)
    keys = _keys()
    for name in ENTRIES:
        info = json.loads((cache / "tiny" / name / "config.json").read_text())
        assert info["key"] == keys[name] == s.info[name]["key"]
        assert (cache / "tiny" / name / "model.safetensors").stat().st_size > 0
    # The returned modules are the saved ones.
    again = load_standins(cache, recipe=Recipe.tiny(), build_if_missing=False)
    assert again.rebuilt == []
    for name in ENTRIES:
        built, loaded = getattr(s, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(built[k], loaded[k]) for k in built)
    # Every stage is logged once, per worker; every entry's build time reaches this process's log.
    text = "\n".join(messages)
    assert "building stand-ins in 2 processes" in text
    tiny_costs = estimated_costs(default_specs(), Recipes.named(Recipe.tiny()))
    tiny_groups = split_entries(list(ENTRIES), POOLS, 2, *tiny_costs)
    assert sorted(n for g in tiny_groups for n in g) == sorted(ENTRIES) and len(tiny_groups) == 2
    for worker, group in enumerate(tiny_groups, 1):
        for pool in {POOLS[n] for n in group}:  # each pool a worker needs is rendered once by it
            stage = "render codec clips" if pool == "clips" else f"render {pool} faces"
            assert sum(f"stand-ins: worker {worker}: {stage}" in m for m in messages) == 1, (worker, stage)
        for name in group:
            assert sum(f"stand-ins: worker {worker}: train {name} (" in m for m in messages) == 1
            assert any(m.startswith(f"worker {worker}: built stand-in {name} in ") for m in messages)


def test_sequential_build_matches_the_parallel_one(parallel_build, tmp_path, monkeypatch, caplog) -> None:
    cache, parallel, _ = parallel_build

    def refuse(*args, **kwargs):
        raise AssertionError(f"{BUILD_WORKERS_ENV}=1 must build in this process")

    monkeypatch.setattr(store, "_build_in_workers", refuse)
    monkeypatch.setenv(BUILD_WORKERS_ENV, "1")
    with caplog.at_level(logging.INFO, logger="consisid_lab.encoders.store"):
        s = load_standins(tmp_path, recipe=Recipe.tiny())
    assert sorted(s.rebuilt) == sorted(ENTRIES)
    assert "intra-op thread(s)" in caplog.text and "worker" not in caplog.text
    # Same seeds per entry: the two builds differ in float rounding only (1 intra-op thread there, 1-2 here).
    for name in ENTRIES:
        a, b = getattr(parallel, name).state_dict(), getattr(s, name).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")


def test_a_tiny_build_stays_in_this_process_unless_workers_are_asked_for(tmp_path, monkeypatch, caplog) -> None:
    pytest.importorskip("consisid_lab.data.synthetic")
    monkeypatch.delenv(BUILD_WORKERS_ENV, raising=False)
    monkeypatch.setattr(store.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(store, "_build_in_workers", lambda *a, **k: pytest.fail("started workers for a tiny build"))
    with caplog.at_level(logging.INFO, logger="consisid_lab.encoders.store"):
        s = load_standins(tmp_path, recipe=Recipe.tiny())
    assert sorted(s.rebuilt) == sorted(ENTRIES)
    assert "less than the 15 s it takes to start them" in caplog.text


@pytest.mark.slow  # the killed-worker test below covers the failure path in the default suite
def test_a_failing_worker_names_its_entries_and_the_other_workers_stay_cached(tmp_path, monkeypatch, caplog) -> None:
    pytest.importorskip("consisid_lab.data.synthetic")
    monkeypatch.setenv(BUILD_WORKERS_ENV, "2")
    monkeypatch.setenv(FAULT_ENV, "identity_net")  # the first entry of worker 1: it fails at once
    with caplog.at_level(logging.INFO, logger="consisid_lab"), pytest.raises(RuntimeError) as failure:
        load_standins(tmp_path, recipe=Recipe.tiny())
    message = str(failure.value)
    assert "stand-in entries identity_net, evaluator_low, evaluator_high did not build" in message
    assert "RuntimeError: fault injected into the build of stand-in identity_net" in message
    assert f"{BUILD_WORKERS_ENV}=1" in message
    assert "Traceback" in caplog.text  # the worker's traceback is logged by the parent
    assert _cached(tmp_path) == ["clip", "codec", "face_gate"]  # worker 2 ran to the end
    # A rerun builds only what is missing.
    monkeypatch.delenv(FAULT_ENV)
    monkeypatch.setenv(BUILD_WORKERS_ENV, "1")
    s = load_standins(tmp_path, recipe=Recipe.tiny())
    assert sorted(s.rebuilt) == ["evaluator_high", "evaluator_low", "identity_net"]


def test_a_killed_worker_is_reported_with_its_signal(parallel_build, tmp_path, monkeypatch) -> None:
    cache, _, _ = parallel_build
    shutil.copytree(cache, tmp_path, dirs_exist_ok=True)
    for name in ("identity_net", "codec"):  # one entry per worker
        (tmp_path / "tiny" / name / "config.json").unlink()
    monkeypatch.setenv(BUILD_WORKERS_ENV, "2")
    monkeypatch.setenv(FAULT_ENV, "codec:sigkill")
    with pytest.raises(RuntimeError, match=r"stand-in entries codec did not build.*killed by SIGKILL"):
        load_standins(tmp_path, recipe=Recipe.tiny())
    assert "identity_net" in _cached(tmp_path) and "codec" not in _cached(tmp_path)


def test_an_invalid_fault_spec_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "identity:sigsegv")
    with pytest.raises(ValueError, match=f"{FAULT_ENV}='identity:sigsegv'"):
        store._injected_fault("identity_net")


def test_a_worker_s_third_party_warning_is_filtered_as_in_one_process() -> None:
    """open_clip's "No pretrained weights loaded" stays out of the log when a build worker's record is re-emitted
    with its ``worker N:`` prefix (the filter the task configs install matches the unprefixed message)."""
    import queue

    from consisid_lab.utils.logging_filters import ThirdPartyInfoFilter

    kept: list[str] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda r: kept.append(r.getMessage())
    handler.addFilter(ThirdPartyInfoFilter(["open_clip"], ["No pretrained weights loaded"]))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        q: queue.Queue = queue.Queue()
        for msg in ("No pretrained weights loaded for model 'x'. Model initialized randomly.", "something else"):
            rec = logging.LogRecord("root", logging.WARNING, "/x/open_clip/factory.py", 1, msg, None, None)
            q.put(("log", 2, rec))
        store._drain(q, store._Progress(), {}, wait_s=0)
    finally:
        root.removeHandler(handler)
    assert kept == ["worker 2: something else"]
