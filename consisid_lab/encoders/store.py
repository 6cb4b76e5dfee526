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
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

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


class _Progress:
    """Rich progress bar when rich is importable and stderr is a terminal, log lines otherwise."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None
        self._label = ""
        self._done = 0
        self._total = 0

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

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def stage(self, label: str, total: int) -> None:
        self._label, self._done, self._total = label, 0, total
        log.info("stand-ins: %s (%d)", label, total)
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._progress is not None:
            self._progress.advance(self._task, n)


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


def build_entries(
    names: list[str],
    specs: dict[str, EntrySpec],
    keys: dict[str, str],
    recipes: Recipes,
    generator_config,
    cache_dir: Path,
) -> dict[str, tuple[nn.Module, dict]]:
    """Render the training pools the requested entries need, train them, save them."""
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
    threads = build_threads()
    log.info("building stand-ins with %d intra-op thread(s)", threads)
    with _build_threads(threads), _Progress() as progress:
        for name in names:
            spec = specs[name]
            t0 = time.perf_counter()
            if spec.pool == "clips" and "clips" not in pools:
                progress.stage("render codec clips", 1)
                pools["clips"] = render_clip_pool(generator_config, recipes.codec, workers=recipe.render_workers)
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
                    workers=recipe.render_workers,
                )
                log.info(
                    "rendered pool %s: %d images in %.1f s",
                    spec.pool,
                    len(pools[spec.pool].labels),
                    time.perf_counter() - tp,
                )
            pool = pools[spec.pool]
            entry_recipe = recipes.for_kind(spec.kind)
            steps = getattr(entry_recipe, spec.steps_field)
            entry_dir = cache_dir / name
            entry_dir.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(recipe.seed * 1000 + spec.seed_offset)
            module = _new_module(spec, entry_dir)
            progress.stage(f"train {name}", steps)
            seed = recipe.seed * 1000 + spec.seed_offset
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
