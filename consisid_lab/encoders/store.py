"""Build-or-load the stand-in encoders of the synthetic benchmark.

Each network is one cache entry ``<cache_dir>/<recipe>/<name>/`` (one folder per recipe: a tiny test build never
replaces the default one) holding ``model.safetensors`` and ``config.json``. The
config carries the architecture, the training recipe, the generator config, a hash of all of them plus the
generator's source (``key``), and the SHA-256 of the weights file. An entry whose key differs from the
requested one (stale) or whose weights do not match their checksum or do not load (corrupt) is logged and
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import signal
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from consisid_lab.data.cache import renderer_source_hash
from consisid_lab.encoders import codec as codec_module
from consisid_lab.encoders import face_gate as face_gate_module
from consisid_lab.encoders.codec import CodecConfig, CodecRecipe, StandInVideoCodec
from consisid_lab.encoders.evaluator import BandPairEvaluator, EvaluatorConfig, EvaluatorNet
from consisid_lab.encoders.face_gate import FaceGate, FaceGateConfig, GateRecipe
from consisid_lab.encoders.identity_net import IdentityNet, IdentityNetConfig
from consisid_lab.encoders.recipes import named_recipe
from consisid_lab.encoders.tiny_clip import TinyClip, TinyClipConfig
from consisid_lab.encoders.training import FacePool, Recipe, render_pool, train_clip, train_margin_net

log = logging.getLogger(__name__)

CACHE_ENV = "CONSISID_LAB_CACHE"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ENTRIES = ("identity_net", "clip", "evaluator_low", "evaluator_high", "codec", "face_gate")  # cached networks
BUILD_THREADS = 2
TRAINER_MODULES = {"codec": codec_module, "face_gate": face_gate_module}  # kinds whose training code is hashed
BUILD_WORKERS_ENV = "CONSISID_LAB_BUILD_WORKERS"  # processes a build may use (1: build in this process)
DEFAULT_BUILD_WORKERS = 2
FAULT_ENV = "CONSISID_LAB_FAULT_STANDIN"  # test hook, see ``_injected_fault``
# Seconds each entry of the default recipe took to build with one intra-op thread, two build processes on an
# otherwise idle 2-core machine (the codec's figure includes rendering its clip pool), and seconds to render the
# face pools entries share: what ``split_entries`` balances the build processes on.
BUILD_COSTS: dict[str, float] = {
    "identity_net": 55.0,
    "clip": 51.0,
    "evaluator_low": 53.0,
    "evaluator_high": 111.0,
    "codec": 101.0,
    "face_gate": 25.0,
}
POOL_COSTS: dict[str, float] = {"encoder": 14.0, "evaluator": 14.0, "clips": 0.0}
# A build in worker processes pays for starting them (spawn, importing torch and the stand-in code, then loading
# what they saved: 11-16 s measured on a loaded 2-core machine); unless CONSISID_LAB_BUILD_WORKERS asks for workers,
# they are used only when the estimate says they save more than this.
MIN_PARALLEL_SAVING_S = 15.0


@dataclass
class StandIns:
    """The trained stand-in networks, all in eval mode. ``evaluator`` joins the two band evaluators; ``codec`` is
    the latent codec of the embedded default run; ``face_gate`` decides where the identity metrics score."""

    identity_net: IdentityNet
    clip: TinyClip
    evaluator: BandPairEvaluator
    evaluator_low: EvaluatorNet
    evaluator_high: EvaluatorNet
    codec: StandInVideoCodec
    face_gate: FaceGate
    build_seconds: float = 0.0  # time spent building entries in this call (0 when everything was cached)
    rebuilt: list[str] = field(default_factory=list)  # entries built in this call
    info: dict[str, dict] = field(default_factory=dict)  # per-entry config.json content


@dataclass
class EntrySpec:
    kind: str  # "identity_net" | "clip" | "evaluator" | "codec" | "face_gate"
    model_config: IdentityNetConfig | TinyClipConfig | EvaluatorConfig | CodecConfig | FaceGateConfig
    pool: str  # which training pool: "encoder", "evaluator" or "clips" (whole encoder-split clips)
    steps_field: str  # recipe field with the number of steps
    seed_offset: int  # distinct seeds per network
    band: str = "full"  # which labels of the pool to learn (``FacePool.batch``)


def default_cache_dir() -> Path:
    """``$CONSISID_LAB_CACHE/standins`` or ``~/.cache/consisid_lab/standins``: ``paths.standin_dir`` of
    conf/paths/default.yaml, so the CLIs and direct calls share one build."""
    env = os.environ.get(CACHE_ENV)
    return (Path(env) if env else Path.home() / ".cache" / "consisid_lab") / "standins"


def recipe_dir(cache_dir: str | Path | None, recipe_name: str) -> Path:
    """The folder of one recipe's entries: ``<cache_dir>/<recipe name>/<entry>``."""
    from consisid_lab.utils.checkpoints import CACHE_MARKER

    if cache_dir is not None and CACHE_MARKER in os.fspath(cache_dir):
        raise ValueError(
            f"stand-in cache {os.fspath(cache_dir)!r} still holds the portable marker {CACHE_MARKER!r} of a stored "
            "run config: resolve the config with consisid_lab.utils.checkpoints.localised_config(...) before "
            "instantiating from it (a build here would write a cache folder named after the marker)"
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / recipe_name


def default_specs() -> dict[str, EntrySpec]:
    return {
        "identity_net": EntrySpec("identity_net", IdentityNetConfig(), "encoder", "identity_steps", 0),
        "clip": EntrySpec("clip", TinyClipConfig(), "encoder", "clip_steps", 1),
        # The low band fits a 32 x 32 grid without loss (radius 0.25 of a 64 grid's Nyquist < 32 grid's).
        "evaluator_low": EntrySpec(
            "evaluator",
            EvaluatorConfig(band="low", image_size=32, widths=(24, 48, 96)),
            "evaluator",
            "low_steps",
            3,
            band="low",
        ),
        "evaluator_high": EntrySpec(
            "evaluator", EvaluatorConfig(band="high"), "evaluator", "high_steps", 4, band="high"
        ),
        # Own recipes (CodecRecipe, GateRecipe): the steps fields name their fields.
        "codec": EntrySpec("codec", CodecConfig(), "clips", "steps", 5),
        "face_gate": EntrySpec("face_gate", FaceGateConfig(), "evaluator", "steps", 6),
    }


@dataclass
class Recipes:
    """The recipe of each kind of entry: the encoders' and evaluators' (``Recipe``), the codec's and the gate's."""

    main: Recipe
    codec: CodecRecipe
    gate: GateRecipe

    @classmethod
    def named(cls, recipe: Recipe) -> Recipes:
        return cls(recipe, named_recipe(recipe.name, CodecRecipe), named_recipe(recipe.name, GateRecipe))

    def for_kind(self, kind: str) -> Recipe | CodecRecipe | GateRecipe:
        return {"codec": self.codec, "face_gate": self.gate}.get(kind, self.main)


def default_generator_config():
    """Generator settings the stand-ins are trained on (64 x 64, both identity families)."""
    from consisid_lab.data.synthetic import SyntheticConfig

    return SyntheticConfig()


def _plain(obj) -> object:
    if is_dataclass(obj):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def entry_key(name: str, spec: EntrySpec, recipe: Recipe | CodecRecipe | GateRecipe, generator_config) -> str:
    """Hash of everything an entry's weights depend on (``recipe``: the recipe of the entry's kind)."""
    payload = {
        "format": FORMAT_VERSION,
        "name": name,
        "kind": spec.kind,
        "model": spec.model_config.to_dict(),
        "pool": spec.pool,
        "steps_field": spec.steps_field,
        "seed_offset": spec.seed_offset,
        "band": spec.band,
        # render_workers changes the speed of a build, not its result
        "recipe": {k: v for k, v in recipe.to_dict().items() if k != "render_workers"},
        "generator": _plain(generator_config),
        "generator_source": renderer_source_hash(),
    }
    if spec.kind in TRAINER_MODULES:
        # The codec's and the gate's training data (negatives, crops, losses) live in their own module: an edit
        # there changes what the weights mean, so it is hashed too.
        payload["trainer_source"] = hashlib.sha256(Path(TRAINER_MODULES[spec.kind].__file__).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _new_module(spec: EntrySpec, entry_dir: Path) -> nn.Module:
    if spec.kind == "identity_net":
        return IdentityNet(spec.model_config)
    if spec.kind == "clip":
        return TinyClip(spec.model_config, config_dir=entry_dir)
    if spec.kind == "evaluator":
        return EvaluatorNet(spec.model_config)
    if spec.kind == "codec":
        return StandInVideoCodec(spec.model_config)
    if spec.kind == "face_gate":
        return FaceGate(spec.model_config)
    raise AssertionError(spec.kind)


def save_entry(module: nn.Module, entry_dir: Path, info: dict) -> dict:
    """Write weights then config (with the weights' checksum); the config is written last, so a crash
    mid-save leaves an entry without a valid config, which is rebuilt."""
    from safetensors.torch import save_model

    entry_dir.mkdir(parents=True, exist_ok=True)
    (entry_dir / CONFIG_FILE).unlink(missing_ok=True)
    weights = entry_dir / WEIGHTS_FILE
    save_model(module, str(weights))
    info = {**info, "weights_sha256": _file_sha256(weights)}
    tmp = entry_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    tmp.replace(entry_dir / CONFIG_FILE)
    return info


def load_entry(spec: EntrySpec, entry_dir: Path, key: str) -> tuple[nn.Module, dict] | str:
    """The cached module, or a string saying why the entry cannot be used."""
    from safetensors.torch import load_model

    config_path, weights = entry_dir / CONFIG_FILE, entry_dir / WEIGHTS_FILE
    if not config_path.exists() or not weights.exists():
        return "missing"
    try:
        info = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable config.json ({err})"
    if info.get("key") != key:
        return "stale (config hash differs from the requested generator config / recipe / architecture)"
    if info.get("weights_sha256") != _file_sha256(weights):
        return "corrupt (weights checksum mismatch)"
    try:
        # The random initialisation is overwritten by the cached weights; forking keeps it off the caller's
        # global RNG, so a run that loads the stand-ins initialises its own model exactly as one that builds them.
        with torch.random.fork_rng(devices=[]):
            module = _new_module(spec, entry_dir)
        load_model(module, str(weights), strict=True)
    except Exception as err:  # noqa: BLE001 - any load failure means the entry is unusable; it gets rebuilt
        return f"corrupt (weights do not load: {err})"
    return module.eval(), info


def standin_fingerprint(cache_dir: str | Path | None, recipe_name: str) -> dict | None:
    """The benchmark version a run measured with: the stand-in entries of one recipe folder, by their checksums.

    ``{"version": <16 hex>, "recipe": name, "entries": {entry: <weights sha256, 16 hex>}}``, where ``version``
    hashes every entry's key (architecture, recipe, generator config and source) and weights checksum; None when
    the folder holds no entry (a run that used no stand-ins). Reads the entries' ``config.json`` only.
    """
    folder = recipe_dir(cache_dir, recipe_name)
    infos: dict[str, dict] = {}
    for name in ENTRIES:
        try:
            infos[name] = json.loads((folder / name / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            continue
    if not infos:
        return None
    identity = {n: [i.get("key"), i.get("weights_sha256")] for n, i in sorted(infos.items())}
    version = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    entries = {n: str(i.get("weights_sha256") or "")[:16] for n, i in sorted(infos.items())}
    return {"version": version, "recipe": recipe_name, "entries": entries}


def build_threads() -> int:
    """Intra-op threads for a build: ``BUILD_THREADS``, or 1 when other work already keeps the cores busy.

    On a shared machine two threads that must meet at every parallel region stall each other; measured here
    under a load of ~6 on 2 cores, one thread ran a training step 3x faster than two.
    """
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return BUILD_THREADS if busy + BUILD_THREADS <= cores + 0.5 else 1


@contextmanager
def _build_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Stages(Protocol):
    """Where a build reports its stages: ``_Progress`` in this process, ``_QueueProgress`` in a worker process."""

    def stage(self, label: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class _Progress:
    """Rich progress bars when rich is importable and stderr is a terminal, log lines otherwise.

    A build in this process shows one bar; a build in worker processes one per worker (``worker=`` of ``stage``
    and ``advance``), each showing that worker's current stage. Every stage is logged once.
    """

    def __init__(self) -> None:
        self._progress = None
        self._tasks: dict[int | None, Any] = {}  # worker (None: this process) -> its rich task

    def __enter__(self) -> _Progress:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self._progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(),
                    console=console,
                    transient=True,
                )
                self._progress.__enter__()
        except ImportError:
            self._progress = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def stage(self, label: str, total: int, worker: int | None = None) -> None:
        description = label if worker is None else f"worker {worker}: {label}"
        log.info("stand-ins: %s (%d)", description, total)
        if self._progress is None:
            return
        task = self._tasks.get(worker)
        if task is None:
            self._tasks[worker] = self._progress.add_task(description, total=total)
        else:  # the worker's line stays in place, showing its new stage
            self._progress.reset(task, total=total, description=description)

    def advance(self, n: int = 1, worker: int | None = None) -> None:
        task = self._tasks.get(worker)
        if self._progress is not None and task is not None:
            self._progress.advance(task, n)


class _QueueProgress:
    """A worker's stages and steps, sent to the parent's ``_Progress`` over the build queue as ``("stage", worker,
    label, total)`` and ``("advance", worker, n)``; steps are batched to one message per ``interval_s``."""

    def __init__(self, queue: Any, worker: int, interval_s: float = 0.5) -> None:
        self._queue = queue
        self._worker = worker
        self._interval_s = interval_s
        self._pending = 0
        self._sent_at = time.monotonic()

    def stage(self, label: str, total: int) -> None:
        self.flush()
        self._queue.put(("stage", self._worker, label, total))

    def advance(self, n: int = 1) -> None:
        self._pending += n
        if time.monotonic() - self._sent_at >= self._interval_s:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._queue.put(("advance", self._worker, self._pending))
            self._pending = 0
        self._sent_at = time.monotonic()


class _WorkerLogHandler(logging.handlers.QueueHandler):
    """Sends a worker's log records to the parent as ``("log", worker, record)``; the parent logs them as its own,
    prefixed ``worker N:``, so they reach its handlers (the train CLI's log file among them)."""

    def __init__(self, queue: Any, worker: int) -> None:
        super().__init__(queue)
        self.worker = worker

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", self.worker, record))


def load_standins(
    cache_dir: str | Path | None = None,
    build_if_missing: bool = True,
    recipe: Recipe | None = None,
    generator_config=None,
    rebuild: bool = False,
) -> StandIns:
    """Load the four cached stand-in networks from ``cache_dir``, building (and caching) any missing, stale or
    corrupt one; ``StandIns.evaluator`` joins the two band evaluators.

    recipe: training recipe (``Recipe()`` by default; ``Recipe.tiny()`` for tests).
    generator_config: the ``SyntheticConfig`` the networks train on (default: the generator's defaults).
    rebuild: ignore the cache and rebuild everything.

    Entries are built in two worker processes on a machine of 2 cores or more (``build_entries``;
    ``$CONSISID_LAB_BUILD_WORKERS`` sets how many, 1 builds them in this process), under a file lock held here.
    """
    recipes = Recipes.named(recipe or Recipe())
    # One folder per recipe: a tiny (test) build never replaces the default stand-ins, which take minutes.
    cache_dir = recipe_dir(cache_dir, recipes.main.name)
    generator_config = generator_config if generator_config is not None else default_generator_config()
    specs = default_specs()
    modules: dict[str, nn.Module] = {}
    infos: dict[str, dict] = {}
    to_build: list[str] = []
    keys = {name: entry_key(name, spec, recipes.for_kind(spec.kind), generator_config) for name, spec in specs.items()}
    for name, spec in specs.items():
        loaded = "rebuild requested" if rebuild else load_entry(spec, cache_dir / name, keys[name])
        if isinstance(loaded, str):
            if loaded == "rebuild requested":
                log.info("stand-in cache entry %s: rebuild requested", cache_dir / name)
            elif loaded != "missing":
                log.warning("stand-in cache entry %s: %s; rebuilding", cache_dir / name, loaded)
            to_build.append(name)
        else:
            modules[name], infos[name] = loaded
    if to_build and not build_if_missing:
        raise FileNotFoundError(
            f"stand-in encoders {to_build} are missing or unusable in {cache_dir} and build_if_missing=False; "
            "run `python -m consisid_lab.validate_benchmark` once to build them"
        )
    start = time.perf_counter()
    if to_build:
        from filelock import FileLock

        cache_dir.mkdir(parents=True, exist_ok=True)
        # One builder at a time (DDP ranks, parallel sweep members share the cache); the others wait, then load.
        with FileLock(str(cache_dir / ".build.lock")):
            if not rebuild:
                waiting, to_build = to_build, []
                for name in waiting:
                    loaded = load_entry(specs[name], cache_dir / name, keys[name])
                    if isinstance(loaded, str):
                        to_build.append(name)
                    else:
                        modules[name], infos[name] = loaded
            if to_build:
                # Training seeds torch's global RNG; the caller's stream is restored afterwards, so a run that
                # builds the stand-ins initialises its own model exactly as a run that loads them from the cache.
                with torch.random.fork_rng(devices=[]):
                    built = build_entries(to_build, specs, keys, recipes, generator_config, cache_dir)
                for name, (module, info) in built.items():
                    modules[name], infos[name] = module, info
    seconds = time.perf_counter() - start if to_build else 0.0
    if to_build:
        log.info("stand-ins built in %.1f s: %s", seconds, ", ".join(to_build))
    return StandIns(
        **{name: modules[name] for name in ENTRIES},
        evaluator=BandPairEvaluator(modules["evaluator_low"], modules["evaluator_high"]).eval(),
        build_seconds=seconds,
        rebuilt=to_build,
        info=infos,
    )


def build_workers() -> int:
    """Processes a build may use: ``$CONSISID_LAB_BUILD_WORKERS`` when set, else ``DEFAULT_BUILD_WORKERS`` on a
    machine of 2 cores or more and 1 below it (1: build in this process, one entry after the other)."""
    raw = os.environ.get(BUILD_WORKERS_ENV, "").strip()
    if not raw:
        return DEFAULT_BUILD_WORKERS if (os.cpu_count() or 1) >= 2 else 1
    try:
        workers = int(raw)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ValueError(
            f"{BUILD_WORKERS_ENV}={raw!r} is not a positive integer; set it to the number of processes that build "
            f"the stand-ins (1 builds them in this process; {DEFAULT_BUILD_WORKERS}, the default on machines of 2 "
            "cores or more, when unset)"
        )
    return workers


def group_cost(
    names: Iterable[str],
    pools: dict[str, str],
    costs: dict[str, float] = BUILD_COSTS,
    pool_costs: dict[str, float] = POOL_COSTS,
) -> float:
    """Estimated seconds to build ``names`` in one process: their own costs plus one render of each pool they use
    (``pools``: entry -> pool name)."""
    names = list(names)
    return sum(costs[n] for n in names) + sum(pool_costs[p] for p in {pools[n] for n in names})


def _pool_images(recipe: Recipe, pool: str) -> int:
    """Images a face pool of ``recipe`` renders (1 for the codec's clips, whose render is in the codec's cost)."""
    per_identity = recipe.videos_per_identity * (recipe.frames_per_video + 1)  # frames + the reference of each video
    if pool == "encoder":
        return recipe.encoder_identities * per_identity
    if pool == "evaluator":
        return recipe.evaluator_identities * per_identity
    return 1


def estimated_costs(specs: dict[str, EntrySpec], recipes: Recipes) -> tuple[dict[str, float], dict[str, float]]:
    """``BUILD_COSTS`` and ``POOL_COSTS`` scaled to ``recipes``: an entry's cost by its training steps over the
    default recipe's, a pool's by its image count over the default one's (the default recipe: the tables as they
    are). Rough, but enough to balance the workers and to tell a minutes-long build from a seconds-long one."""
    default = Recipes.named(Recipe())
    costs = {}
    for name, spec in specs.items():
        if name in BUILD_COSTS:  # an entry without a cost is refused by split_entries
            steps = getattr(recipes.for_kind(spec.kind), spec.steps_field)
            default_steps = getattr(default.for_kind(spec.kind), spec.steps_field)
            costs[name] = BUILD_COSTS[name] * steps / max(1, default_steps)
    pool_costs = {
        pool: cost * _pool_images(recipes.main, pool) / _pool_images(default.main, pool)
        for pool, cost in POOL_COSTS.items()
    }
    return costs, pool_costs


def _assignments(n: int, k: int) -> Iterator[tuple[int, ...]]:
    """Every way to put ``n`` items into at most ``k`` unlabelled groups, as the group index of each item (each
    index at most one above the largest before it, so no partition comes twice)."""

    def grow(prefix: tuple[int, ...], used: int) -> Iterator[tuple[int, ...]]:
        if len(prefix) == n:
            yield prefix
            return
        for g in range(min(used + 1, k)):
            yield from grow((*prefix, g), max(used, g + 1))

    yield from grow((), 0)


def split_entries(
    names: list[str],
    pools: dict[str, str],
    groups: int,
    costs: dict[str, float] = BUILD_COSTS,
    pool_costs: dict[str, float] = POOL_COSTS,
) -> list[list[str]]:
    """Split ``names`` into at most ``groups`` groups whose longest ``group_cost`` is as short as it can be (ties:
    the least total work, i.e. the fewest pools rendered twice); the costliest group first, each group in the order
    of ``names``. Exhaustive: a handful of entries has few partitions (203 for 6 entries into any number of groups).
    """
    missing = sorted({n for n in names if n not in costs} | {n for n in names if pools[n] not in pool_costs})
    if missing:
        raise ValueError(
            f"no build cost for stand-in entries {missing} (or for their pools); add them to BUILD_COSTS (seconds to "
            "build the entry with one thread) and their pool to POOL_COSTS (seconds to render it)"
        )
    if groups < 1:
        raise ValueError(f"groups={groups} must be >= 1")
    if not names:
        return []
    best: tuple[tuple[float, float], list[list[str]]] | None = None
    for assignment in _assignments(len(names), min(groups, len(names))):
        members = [[n for n, g in zip(names, assignment) if g == k] for k in range(max(assignment) + 1)]
        spans = [group_cost(m, pools, costs, pool_costs) for m in members]
        score = (max(spans), sum(spans))
        if best is None or score < best[0]:
            best = (score, members)
    assert best is not None
    return sorted(best[1], key=lambda m: -group_cost(m, pools, costs, pool_costs))


def _injected_fault(name: str) -> None:
    """Fault point for the tests of a failing build: ``CONSISID_LAB_FAULT_STANDIN=<entry>[:kind][,...]`` makes the
    build of ``<entry>`` raise a RuntimeError (kind ``raise``, the default) or kill its process with SIGKILL (kind
    ``sigkill``, as the out-of-memory killer would) before it trains. Unset in normal use."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        entry, _, kind = item.partition(":")
        if entry not in ENTRIES or kind not in ("", "raise", "sigkill"):
            raise ValueError(
                f"{FAULT_ENV}={raw!r}: {item!r} is not <entry>[:raise|:sigkill] with an entry of "
                f"{', '.join(ENTRIES)}; fix or unset {FAULT_ENV} (it exists for the tests of a failing build)"
            )
        if entry != name:
            continue
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fault injected into the build of stand-in {name} ({FAULT_ENV}={raw!r})")


def build_entries(
    names: list[str],
    specs: dict[str, EntrySpec],
    keys: dict[str, str],
    recipes: Recipes,
    generator_config,
    cache_dir: Path,
) -> dict[str, tuple[nn.Module, dict]]:
    """Render the training pools the requested entries need, train them, save them; return them in eval mode.

    With ``build_workers()`` >= 2 and more than one entry to build, the entries are split into groups balanced on
    their estimated costs (``estimated_costs``, ``split_entries``), each group is built in its own spawned process
    with one intra-op thread (``_build_in_workers``), and the modules returned are the saved entries loaded back.
    Otherwise, or when the workers would save less than ``MIN_PARALLEL_SAVING_S`` and ``$CONSISID_LAB_BUILD_WORKERS``
    does not ask for them (a tiny recipe), the entries are built here, one after the other, with
    ``build_threads()`` intra-op threads.

    Either way an entry is trained from its own seed (``recipe.seed * 1000 + seed_offset``) on pools rendered from
    per-identity seeds, so the group or process that builds it does not change what it learns; a build with one
    intra-op thread and one with two differ in float rounding only.
    """
    workers = min(build_workers(), len(names))
    if workers > 1:
        pools = {n: specs[n].pool for n in names}
        costs, pool_costs = estimated_costs(specs, recipes)
        groups = split_entries(names, pools, workers, costs, pool_costs)
        spans = [group_cost(g, pools, costs, pool_costs) for g in groups]
        saving = group_cost(names, pools, costs, pool_costs) - max(spans)
        requested = bool(os.environ.get(BUILD_WORKERS_ENV, "").strip())
        if len(groups) > 1 and (requested or saving >= MIN_PARALLEL_SAVING_S):
            return _build_in_workers(groups, spans, specs, keys, recipes, generator_config, cache_dir)
        if len(groups) > 1:
            log.info(
                "building stand-ins in this process: %d worker processes would save about %.0f s, less than the "
                "%.0f s it takes to start them (%s=%d uses them anyway)",
                len(groups),
                saving,
                MIN_PARALLEL_SAVING_S,
                BUILD_WORKERS_ENV,
                len(groups),
            )
    threads = build_threads()
    log.info("building stand-ins with %d intra-op thread(s)", threads)
    with _build_threads(threads), _Progress() as progress:
        return _build_group(
            names, specs, keys, recipes, generator_config, cache_dir, progress, recipes.main.render_workers
        )


def _build_group(
    names: list[str],
    specs: dict[str, EntrySpec],
    keys: dict[str, str],
    recipes: Recipes,
    generator_config,
    cache_dir: Path,
    progress: _Stages,
    render_workers: int,
) -> dict[str, tuple[nn.Module, dict]]:
    """Build ``names`` one after the other in this process, rendering each pool they need once
    (``render_workers``: processes per render; 1 in a worker process, which starts no processes of its own)."""
    from consisid_lab.encoders.captions import attribute_captions
    from consisid_lab.encoders.codec import render_clip_pool, train_codec
    from consisid_lab.encoders.face_gate import train_face_gate

    recipe = recipes.main

    out: dict[str, tuple[nn.Module, dict]] = {}
    pools: dict[str, FacePool] = {}
    pool_args = {
        "encoder": ("encoder", recipe.encoder_identities, "identity"),
        "evaluator": ("evaluator", recipe.evaluator_identities, "band_mixed"),
    }
    for name in names:
        spec = specs[name]
        t0 = time.perf_counter()
        if spec.pool == "clips" and "clips" not in pools:
            progress.stage("render codec clips", 1)
            pools["clips"] = render_clip_pool(generator_config, recipes.codec, workers=render_workers)
            progress.advance()
        elif spec.pool not in pools:
            split, count, kind = pool_args[spec.pool]
            progress.stage(f"render {spec.pool} faces", count)
            tp = time.perf_counter()
            pools[spec.pool] = render_pool(
                generator_config,
                split,
                count,
                recipe,
                kind=kind,
                captioner=attribute_captions if spec.pool == "encoder" else None,
                on_identities=progress.advance,
                workers=render_workers,
            )
            log.info(
                "rendered pool %s: %d images in %.1f s",
                spec.pool,
                len(pools[spec.pool].labels),
                time.perf_counter() - tp,
            )
        _injected_fault(name)
        pool = pools[spec.pool]
        entry_recipe = recipes.for_kind(spec.kind)
        steps = getattr(entry_recipe, spec.steps_field)
        entry_dir = cache_dir / name
        entry_dir.mkdir(parents=True, exist_ok=True)
        seed = recipe.seed * 1000 + spec.seed_offset
        torch.manual_seed(seed)
        module = _new_module(spec, entry_dir)
        progress.stage(f"train {name}", steps)
        if spec.kind == "clip":
            stats = train_clip(module, pool, recipe, steps, seed, on_step=progress.advance)
        elif spec.kind == "codec":
            stats = train_codec(module, pool, recipes.codec, on_step=progress.advance)
        elif spec.kind == "face_gate":
            stats = train_face_gate(module, pool.images, recipes.gate, on_step=progress.advance)
        else:
            stats = train_margin_net(module, pool, recipe, steps, seed, on_step=progress.advance, band=spec.band)
        stats["seconds"] = time.perf_counter() - t0
        info = {
            "name": name,
            "kind": spec.kind,
            "key": keys[name],
            "format": FORMAT_VERSION,
            "model_config": spec.model_config.to_dict(),
            "recipe": entry_recipe.to_dict(),
            "generator_config": _plain(generator_config),
            "pool": spec.pool,
            "train": stats,
        }
        info = save_entry(module, entry_dir, info)
        log.info("built stand-in %s in %.1f s (final loss %.3f)", name, stats["seconds"], stats["final_loss"])
        out[name] = (module.eval(), info)
    return out


def _build_worker(
    worker: int,
    names: list[str],
    specs: dict[str, EntrySpec],
    keys: dict[str, str],
    recipes: Recipes,
    generator_config,
    cache_dir: Path,
    queue: Any,
    log_level: int,
) -> None:
    """One worker process of a parallel build (top-level: spawn pickles it by name). Builds and saves ``names``
    with one intra-op thread; its stages, steps and log records go to the parent over ``queue``, then
    ``("done", worker)`` or ``("error", worker, summary, traceback)``."""
    root = logging.getLogger()
    root.handlers[:] = [_WorkerLogHandler(queue, worker)]
    root.setLevel(log_level)
    torch.set_num_threads(1)
    progress = _QueueProgress(queue, worker)
    try:
        _build_group(names, specs, keys, recipes, generator_config, cache_dir, progress, render_workers=1)
        progress.flush()
    except Exception as err:  # noqa: BLE001 - any failure goes to the parent, which names the entries it cost
        queue.put(("error", worker, f"{type(err).__name__}: {err}", traceback.format_exc()))
        return
    queue.put(("done", worker))


def _drain(queue: Any, progress: _Progress, finished: dict[int, str | None], wait_s: float) -> None:
    """Handle every message on the build queue, waiting up to ``wait_s`` for the first one. ``finished`` gets
    ``worker -> None`` for a worker that is done and ``worker -> error`` for one that failed."""
    import queue as queue_module

    block = wait_s > 0
    while True:
        try:
            message = queue.get(timeout=wait_s) if block else queue.get_nowait()
        except queue_module.Empty:
            return
        block = False
        kind, worker = message[0], message[1]
        if kind == "stage":
            progress.stage(message[2], message[3], worker=worker)
        elif kind == "advance":
            progress.advance(message[2], worker=worker)
        elif kind == "log":
            record: logging.LogRecord = message[2]
            record.unprefixed_message = record.getMessage()  # what logging filters match (ThirdPartyInfoFilter)
            record.msg, record.args = f"worker {worker}: {record.unprefixed_message}", None
            logger = logging.getLogger(None if record.name == "root" else record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        elif kind == "done":
            finished[worker] = None
        elif kind == "error":
            finished[worker] = message[2]
            log.error("stand-in build worker %d failed:\n%s", worker, message[3])


def _build_in_workers(
    groups: list[list[str]],
    spans: list[float],
    specs: dict[str, EntrySpec],
    keys: dict[str, str],
    recipes: Recipes,
    generator_config,
    cache_dir: Path,
) -> dict[str, tuple[nn.Module, dict]]:
    """Build each group in its own spawned process (``_build_worker``; ``spans``: their estimated seconds, for the
    log) while showing their progress, then load what they saved. A worker that raises or dies costs only its own
    entries: the parent waits for the others, whose entries stay cached, and raises a RuntimeError naming the
    entries that did not build and why."""
    import multiprocessing

    from consisid_lab.utils.faults import describe_exit

    # spawn, not fork: forking a process whose torch thread pools are running can deadlock.
    ctx = multiprocessing.get_context("spawn")
    log.info(
        "building stand-ins in %d processes of 1 intra-op thread: %s",
        len(groups),
        "; ".join(
            f"worker {i}: {', '.join(g)} (about {span:.0f} s)" for i, (g, span) in enumerate(zip(groups, spans), 1)
        ),
    )
    # Workers forward records at the most verbose level any of these loggers passes; the parent filters them again.
    log_level = min(logging.getLogger(n).getEffectiveLevel() for n in ("", "consisid_lab", __name__))
    finished: dict[int, str | None] = {}
    with ctx.Manager() as manager, _Progress() as progress:
        queue = manager.Queue()
        procs = {
            i: ctx.Process(
                target=_build_worker,
                args=(i, group, specs, keys, recipes, generator_config, cache_dir, queue, log_level),
                name=f"stand-in build worker {i}",
            )
            for i, group in enumerate(groups, 1)
        }
        try:
            for proc in procs.values():
                proc.start()
            while True:
                running = any(proc.is_alive() for proc in procs.values())
                # A worker's messages are on the queue before it exits: after the last exit one drain gets them all.
                _drain(queue, progress, finished, wait_s=0.2 if running else 0.0)
                if not running:
                    break
        finally:
            for proc in procs.values():
                if proc.pid is None:
                    continue
                if proc.is_alive():
                    proc.terminate()
                proc.join()
    for i, proc in procs.items():
        if i not in finished:
            finished[i] = describe_exit(proc.exitcode if proc.exitcode is not None else -signal.SIGTERM)[1]
    out: dict[str, tuple[nn.Module, dict]] = {}
    missing: dict[str, str] = {}
    for group in groups:
        for name in group:
            loaded = load_entry(specs[name], cache_dir / name, keys[name])
            if isinstance(loaded, str):
                missing[name] = loaded
            else:
                out[name] = loaded
    errors = {i: error for i, error in finished.items() if error is not None}
    if missing:
        parts = []
        for i, group in enumerate(groups, 1):
            lost = [n if missing[n] == "missing" else f"{n} ({missing[n]})" for n in group if n in missing]
            if lost:
                why = errors.get(i, "finished, but its entries do not load")
                parts.append(f"worker {i} ({', '.join(group)}): {why}; not built: {', '.join(lost)}")
        raise RuntimeError(
            f"stand-in entries {', '.join(missing)} did not build in {cache_dir}: {'; '.join(parts)}. The entries "
            "that built are cached, so a rerun builds only the missing ones; "
            f"{BUILD_WORKERS_ENV}=1 builds them in this process, where a failure shows its own traceback"
        )
    for i, error in errors.items():
        log.warning(
            "stand-in build worker %d failed after saving all its entries (%s); they load and are used", i, error
        )
    return out
