"""Study files and search-space files: TOML in, validated frozen dataclasses out.

Every mistake in a file raises one UserError line that names the file, the dotted key, what is
wrong and what is allowed. Unknown keys are errors, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from optimizer import DATA
from optimizer.engine.profile import DIRECTION_KINDS, MAX_DIRECTIONS, SHAPES
from optimizer.errors import UserError
from optimizer.study.storage import redact

BUNDLED_SEARCH_SPACES_DIR = DATA / "search_spaces"
SCOPES = ("global", "per_layer")
COMPONENTS = ("attn", "mlp")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ORGANISM = "organism"
MAX_WEIGHT_LIMIT = 5.0
STORAGE_SCHEMES = ("sqlite:///PATH.db", "postgresql://…", "postgresql+psycopg://…")

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SPACE_NAME = re.compile(r"^[\w-]+$")


# ---------------------------------------------------------------------------------------------
# Search spaces


@dataclass(frozen=True)
class Range:
    """A searched interval, or a fixed value when ``low == high``.

    Bounds of layer-valued ranges may be percent strings like ``"60%"`` (of depth L − 1);
    ``name`` is the dotted key, also usable as the Optuna parameter name.
    """

    name: str
    low: float | str
    high: float | str
    is_position: bool = False  # a layer index: resolved bounds are clamped to [0, L − 1]

    # A range mixing layers and percents can only be ordered once the depth is known; if its
    # bounds cross on some model, resolve() collapses it onto the absolute bound.

    @property
    def is_fixed(self) -> bool:
        return self.low == self.high

    def resolve(self, n_layers: int) -> tuple[float, float]:
        """(low, high) in layers for a model with ``n_layers`` decoder layers."""
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        low, high = (_resolve_bound(b, n_layers, self.is_position) for b in (self.low, self.high))
        if low > high:
            # Only a mix of layers and percents can cross (e.g. [1, "60%"] on a 2-layer model):
            # the absolute bound wins, so the range collapses onto it.
            low = high = low if isinstance(self.high, str) else high
        return low, high


def _resolve_bound(bound: float | str, n_layers: int, is_position: bool) -> float:
    depth = n_layers - 1
    if isinstance(bound, str):
        value = _bound_value(bound) / 100 * depth
    else:
        value = float(bound)
    return min(max(value, 0.0), float(depth)) if is_position else value


@dataclass(frozen=True)
class ComponentSpace:
    """Profile ranges for one steered projection (``attn`` = o_proj, ``mlp`` = down_proj)."""

    max_weight: Range
    max_weight_position: Range
    min_weight_fraction: Range
    min_weight_distance: Range
    enabled: bool = True

    def ranges(self) -> tuple[Range, ...]:
        return (self.max_weight, self.max_weight_position, self.min_weight_fraction,
                self.min_weight_distance)


@dataclass(frozen=True)
class SearchSpace:
    """Everything the optimizer may vary, as read from one search-space file."""

    shape: str
    direction_scopes: tuple[str, ...]
    direction_index: Range
    attn: ComponentSpace
    mlp: ComponentSpace
    path: Path = field(compare=False)
    # The edit, each a list of choices the optimizer picks from; the defaults are the
    # original edit (one difference-of-means direction, removed as it is).
    direction_kinds: tuple[str, ...] = ("difference",)
    n_directions: tuple[int, ...] = (1,)
    norm_preserving: tuple[bool, ...] = (False,)

    def components(self) -> dict[str, ComponentSpace]:
        """The enabled components by name."""
        return {name: c for name, c in (("attn", self.attn), ("mlp", self.mlp)) if c.enabled}

    def ranges(self) -> tuple[Range, ...]:
        """The ranges that matter: direction_index if a global scope is possible, then the
        ranges of every enabled component."""
        head = (self.direction_index,) if "global" in self.direction_scopes else ()
        return head + tuple(r for c in self.components().values() for r in c.ranges())

    def resolve(self, n_layers: int) -> dict[str, tuple[float, float]]:
        """Every relevant range resolved for a model with ``n_layers`` layers, by name."""
        resolved = {}
        for r in self.ranges():
            low, high = r.resolve(n_layers)
            if r.name.endswith("min_weight_distance") and low <= 0:
                raise UserError(f"{self.path}: {r.name}: low {_format_bound(r.low)} resolves to "
                                f"{low:g} layers on a model with {n_layers} layers; it must be > 0, "
                                "e.g. 1")
            resolved[r.name] = (low, high)
        if max(self.n_directions) > n_layers:
            raise UserError(f"{self.path}: n_directions: {max(self.n_directions)} directions per layer need "
                            f"as many layers; the model has {n_layers}")
        return resolved

    def fingerprint(self) -> str:
        """sha256 of the parsed contents; changes whenever the space does, not with formatting."""
        content = asdict(self)
        del content["path"]
        # Edit choices left at the original edit are not part of it, so that a space written
        # before they existed keeps its fingerprint (and its studies stay resumable).
        for name in _EDIT_DEFAULTS:
            if tuple(content[name]) == _EDIT_DEFAULTS[name]:
                del content[name]
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def bundled_search_spaces() -> tuple[str, ...]:
    """Names of the search spaces shipped with abopt."""
    return tuple(sorted(p.stem for p in BUNDLED_SEARCH_SPACES_DIR.glob("*.toml")))


def load_search_space(spec: str, *, base_dir: Path | None = None) -> SearchSpace:
    """Load a bundled search space by name (``default``) or a ``.toml`` file (relative to
    ``base_dir``, default the working directory)."""
    return _load_search_space(_search_space_path(spec, base_dir, where=None))


def _search_space_path(spec: str, base_dir: Path | None, where: str | None) -> Path:
    prefix = f"{where}: " if where else ""
    if _SPACE_NAME.match(spec):
        names = bundled_search_spaces()
        if spec in names:
            return BUNDLED_SEARCH_SPACES_DIR / f"{spec}.toml"
        close = difflib.get_close_matches(spec, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"{prefix}unknown search space '{spec}'; {hint}use one of "
                        f"{', '.join(names)} or a path to a .toml file")
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "not found"
        raise UserError(f"{prefix}search-space file {path} {problem}; use one of "
                        f"{', '.join(bundled_search_spaces())} or a path to a .toml file")
    return path


_EDIT_DEFAULTS = {"direction_kinds": ("difference",), "n_directions": (1,), "norm_preserving": (False,)}
_COMPONENT_KEYS = ("enabled", "max_weight", "max_weight_position", "min_weight_fraction",
                   "min_weight_distance")
# The allowed keys of every table of a search-space file ("" = the top level).
_SPACE_SCHEMA = {
    "": ("shape", "direction_scope", "direction_index", "direction_kind", "n_directions", "norm_preserving",
         *COMPONENTS),
    **{name: _COMPONENT_KEYS for name in COMPONENTS},
}


def _load_search_space(path: Path) -> SearchSpace:
    top = _Table(path, "", _read_toml(path))
    top.check_keys(_SPACE_SCHEMA)
    shape = top.string("shape", choices=SHAPES)
    scopes = top.value("direction_scope")
    listed = [scopes] if isinstance(scopes, str) else scopes
    if (not isinstance(listed, list) or not listed or len(set(map(str, listed))) < len(listed)
            or not all(isinstance(s, str) and s in SCOPES for s in listed)):
        top.fail("direction_scope", f"expected {_choices(SCOPES)} or a list of both, got {_show(scopes)}")
    direction_index = _range(top, "direction_index", layers=True, is_position=True)
    components = {}
    for name in COMPONENTS:
        table = top.table(name)
        table.check_keys(_SPACE_SCHEMA)
        components[name] = ComponentSpace(
            max_weight=_range(table, "max_weight", minimum=0.0, maximum=MAX_WEIGHT_LIMIT),
            max_weight_position=_range(table, "max_weight_position", layers=True, is_position=True),
            min_weight_fraction=_range(table, "min_weight_fraction", minimum=0.0, maximum=1.0),
            min_weight_distance=_range(table, "min_weight_distance", layers=True, positive=True),
            enabled=table.boolean("enabled", default=True),
        )
    if not any(c.enabled for c in components.values()):
        raise UserError(f"{path}: attn.enabled, mlp.enabled: both components are disabled; "
                        "set enabled = true in at least one of [attn] and [mlp]")
    return SearchSpace(
        shape=shape,
        direction_scopes=tuple(listed),
        direction_index=direction_index,
        attn=components["attn"],
        mlp=components["mlp"],
        path=path.resolve(),
        direction_kinds=_choice_list(top, "direction_kind", "difference", DIRECTION_KINDS, str,
                                     f"{_choices(DIRECTION_KINDS)} or a list of them"),
        n_directions=_choice_list(top, "n_directions", 1, tuple(range(1, MAX_DIRECTIONS + 1)), int,
                                  f"a whole number of directions within 1..{MAX_DIRECTIONS}, or a list of them"),
        norm_preserving=_choice_list(top, "norm_preserving", False, (False, True), bool,
                                     "true, false or [false, true]"),
    )


def _choice_list(table: _Table, key: str, default: Any, allowed: tuple, kind: type, expected: str) -> tuple:
    """A value or a list of distinct values from ``allowed``, as a tuple (the default alone when absent)."""
    raw = table.value(key, default)
    listed = raw if isinstance(raw, list) else [raw]
    # bool is an int in Python: a count of directions must not be given as true/false.
    fits = all(isinstance(v, kind) and (kind is bool or not isinstance(v, bool)) and v in allowed for v in listed)
    if not listed or not fits or len(set(listed)) < len(listed):
        table.fail(key, f"expected {expected}, got {_show(raw)}")
    return tuple(listed)


def _range(table: _Table, key: str, *, layers: bool = False, is_position: bool = False,
           positive: bool = False, minimum: float = 0.0, maximum: float = math.inf) -> Range:
    """Parse ``[low, high]`` or a single fixed value."""
    raw = table.value(key)
    if isinstance(raw, list):
        if len(raw) != 2:
            table.fail(key, f"expected [low, high] or a single value, got an array of {len(raw)}")
        low, high = (_bound(table, key, b, layers, positive, minimum, maximum) for b in raw)
    else:
        low = high = _bound(table, key, raw, layers, positive, minimum, maximum)
    # Bounds of one kind can be compared now; layers against percents only once the model's
    # depth is known (Range.resolve).
    if type(low) is type(high) and _bound_value(low) > _bound_value(high):
        table.fail(key, f"low {_format_bound(low)} > high {_format_bound(high)}; write [low, high]")
    return Range(table.dotted(key), low, high, is_position)


def _bound(table: _Table, key: str, raw: Any, layers: bool, positive: bool, minimum: float,
           maximum: float) -> float | str:
    if layers and isinstance(raw, str):
        value = _parse_percent(raw)
        if value is None:
            table.fail(key, f"expected a number of layers or a percentage like \"60%\", got {_show(raw)}")
        if value < 0 or value > 100 or (positive and value == 0):
            allowed = "(0%, 100%]" if positive else "[0%, 100%]"
            table.fail(key, f"percentage {raw.strip()} is out of range; it must be within {allowed}")
        return f"{_format_number(value)}%"
    if not _is_number(raw):
        kind = "a number of layers or a percentage like \"60%\"" if layers else "a number"
        table.fail(key, f"expected {kind}, or [low, high], got {_show(raw)}")
    value = float(raw)
    if positive and value <= 0:
        table.fail(key, f"{_format_number(value)} is out of range; it must be > 0 layers")
    if not minimum <= value <= maximum:
        allowed = f"at least {minimum:g}" if maximum == math.inf else f"within [{minimum:g}, {maximum:g}]"
        table.fail(key, f"{_format_number(value)} is out of range; it must be {allowed}")
    return value


def _parse_percent(text: str) -> float | None:
    """The N of "N%", or None when ``text`` is not a percentage."""
    text = text.strip()
    if not text.endswith("%"):
        return None
    try:
        value = float(text[:-1])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _bound_value(bound: float | str) -> float:
    return _parse_percent(bound) if isinstance(bound, str) else bound  # type: ignore[return-value]


def _format_bound(bound: float | str) -> str:
    return bound if isinstance(bound, str) else _format_number(bound)


def _format_number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


# ---------------------------------------------------------------------------------------------
# Study files


@dataclass(frozen=True)
class PromptsConfig:
    """Prompt sets and how many prompts of each to use.

    Sources are strings that ``optimizer.prompts`` reads: ``bundled:NAME[:SPLIT]``, a .jsonl or
    .txt path (relative to the study file), or ``hf:org/name[:split[:column]]``.
    """

    harmful_measure: str = "bundled:harmful:measure"
    harmless_measure: str = "bundled:harmless:measure"
    harmful_eval: str = "bundled:harmful:eval"
    harmless_eval: str = "bundled:harmless:eval"
    n_measure: int = 128
    n_eval: int = 64
    system_prompt: str = ""
    thinking: bool = False  # a reasoning model's chat template gets enable_thinking = this


@dataclass(frozen=True)
class EvaluationConfig:
    max_new_tokens: int = 32
    kl_tokens: int = 1  # 1 = first response token; k > 1 = teacher-forced over k greedy tokens
    markers: str = "bundled"  # or a .txt path relative to the study file
    batch_size: int = 0  # 0 = automatic
    sample_answers: int = 3
    judge: str = "markers"  # "markers", "bundled" (the tiny bundled judge), or a chat model's path or HF id
    judge_template: str = ""  # "" = the bundled template; else a text file with {request} and {answer}
    confirm_tokens: int = 128  # answer length when a front trial is confirmed; 0 = no confirmation
    replay_layers: bool = True  # start each trial at its first steered layer (same results)
    share_prefix: bool = True  # the prompts' common chat-template prefix runs once per pass (same results)
    fast_exp: bool = True  # on a CPU, SiLU and attention use abopt's exp: ~2.5x faster, closer to the true exp


@dataclass(frozen=True)
class OptimizationConfig:
    n_trials: int = 60
    n_startup_trials: int = 12
    seed: int = 0
    kl_ceiling: float = 0.0  # 0 = none
    screening: bool = True  # stop scoring a trial once it cannot reach the front (same front)


@dataclass(frozen=True)
class StudyConfig:
    """One study file, validated. ``model`` (when a directory), ``storage_url`` and ``path`` are
    absolute; prompt and marker paths stay as written, relative to ``base_dir``."""

    name: str
    model: str  # "organism", an absolute directory path, or a Hugging Face id
    search_space: SearchSpace
    storage_url: str
    dtype: str
    trust_remote_code: bool
    prompts: PromptsConfig
    evaluation: EvaluationConfig
    optimization: OptimizationConfig
    path: Path

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths in the study file (prompts, markers) are relative to."""
        return self.path.parent


# The allowed keys of every table of a study file ("" = the top level).
_STUDY_SCHEMA = {
    "": ("name", "model", "search_space", "storage", "dtype", "trust_remote_code",
         "prompts", "evaluation", "optimization"),
    "prompts": tuple(f.name for f in fields(PromptsConfig)),
    "evaluation": tuple(f.name for f in fields(EvaluationConfig)),
    "optimization": tuple(f.name for f in fields(OptimizationConfig)),
}


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file."""
    path = Path(path).expanduser()
    top = _Table(path, "", _read_toml(path))
    top.check_keys(_STUDY_SCHEMA)
    base_dir = path.resolve().parent

    name = top.string("name", default=path.stem).strip()
    if not name:
        top.fail("name", "is empty; give the study a name like \"demo\"")
    model = _model(top, base_dir)
    spec = top.string("search_space", default="default", nonempty=True).strip()
    space = _load_search_space(_search_space_path(spec, base_dir, where=f"{path}: search_space"))
    storage = top.string("storage", default="", nonempty="storage" in top.data)
    storage_url = (_storage_url(storage, base_dir, where=f"{path}: storage") if storage
                   else _sqlite_url(base_dir / f"{path.stem}.db"))
    dtype = top.string("dtype", default="auto", choices=DTYPES)
    trust_remote_code = top.boolean("trust_remote_code", default=False)

    t = top.table("prompts", optional=True)
    t.check_keys(_STUDY_SCHEMA)
    d = PromptsConfig()
    prompts = PromptsConfig(
        harmful_measure=t.string("harmful_measure", default=d.harmful_measure, nonempty=True),
        harmless_measure=t.string("harmless_measure", default=d.harmless_measure, nonempty=True),
        harmful_eval=t.string("harmful_eval", default=d.harmful_eval, nonempty=True),
        harmless_eval=t.string("harmless_eval", default=d.harmless_eval, nonempty=True),
        n_measure=t.integer("n_measure", default=d.n_measure, minimum=1),
        n_eval=t.integer("n_eval", default=d.n_eval, minimum=1),
        system_prompt=t.string("system_prompt", default=d.system_prompt),
        thinking=t.boolean("thinking", default=d.thinking),
    )

    t = top.table("evaluation", optional=True)
    t.check_keys(_STUDY_SCHEMA)
    e = EvaluationConfig()
    evaluation = EvaluationConfig(
        max_new_tokens=t.integer("max_new_tokens", default=e.max_new_tokens, minimum=1),
        kl_tokens=t.integer("kl_tokens", default=e.kl_tokens, minimum=1),
        markers=t.string("markers", default=e.markers, nonempty=True),
        batch_size=t.integer("batch_size", default=e.batch_size, minimum=0),
        sample_answers=t.integer("sample_answers", default=e.sample_answers, minimum=0),
        judge=_judge(t, base_dir),
        judge_template=_relative_file(t, "judge_template", base_dir),
        confirm_tokens=t.integer("confirm_tokens", default=e.confirm_tokens, minimum=0),
        replay_layers=t.boolean("replay_layers", default=e.replay_layers),
        share_prefix=t.boolean("share_prefix", default=e.share_prefix),
        fast_exp=t.boolean("fast_exp", default=e.fast_exp),
    )

    t = top.table("optimization", optional=True)
    t.check_keys(_STUDY_SCHEMA)
    o = OptimizationConfig()
    n_trials = t.integer("n_trials", default=o.n_trials, minimum=1)
    # DESIGN: about a fifth of the trials sample at random before TPE takes over.
    typical = max(1, round(0.2 * n_trials))
    n_startup = t.integer("n_startup_trials", default=typical, minimum=0)
    if n_startup > n_trials:
        t.fail("n_startup_trials", f"{n_startup} is more than n_trials = {n_trials}; "
                                   f"use at most {n_trials} (about {typical} is typical)")
    optimization = OptimizationConfig(
        n_trials=n_trials,
        n_startup_trials=n_startup,
        seed=t.integer("seed", default=o.seed, minimum=0, maximum=2**32 - 1),
        kl_ceiling=t.number("kl_ceiling", default=o.kl_ceiling, minimum=0.0),
        screening=t.boolean("screening", default=o.screening),
    )

    return StudyConfig(
        name=name,
        model=model,
        search_space=space,
        storage_url=storage_url,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        prompts=prompts,
        evaluation=evaluation,
        optimization=optimization,
        path=path.resolve(),
    )


def _judge(table: _Table, base_dir: Path) -> str:
    """The judge: "markers", "bundled", a Hugging Face id, or a model directory (made absolute)."""
    judge = table.string("judge", default=EvaluationConfig.judge, nonempty=True).strip()
    if judge in ("markers", "bundled"):
        return judge
    candidate = Path(judge).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if candidate.is_dir():
        return str(candidate.resolve())
    if judge.startswith((".", "/", "~")) or judge.count("/") != 1:
        table.fail("judge", f"{judge!r} is neither \"markers\", \"bundled\", a model directory nor a Hugging Face "
                            "id (org/name); e.g. judge = \"mlx-community/Qwen2.5-1.5B-Instruct-4bit\"")
    return judge


def _relative_file(table: _Table, key: str, base_dir: Path) -> str:
    """An optional file path (relative to the study file), made absolute; "" when not given."""
    value = table.string(key, default="").strip()
    if not value:
        return ""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        table.fail(key, f"file {path} does not exist; give a text file (relative paths are relative to the study file)")
    return str(path.resolve())


def _model(top: _Table, base_dir: Path) -> str:
    model = top.string("model", nonempty=True).strip()
    if model == ORGANISM:
        return model
    candidate = Path(model).expanduser()
    if not candidate.is_absolute():
        candidate = base_dir / candidate
    if model.startswith((".", "/", "~")) or candidate.exists():
        if not candidate.is_dir():
            problem = "is a file, not a directory" if candidate.exists() else "does not exist"
            top.fail("model", f"model directory {candidate} {problem}; give a model directory "
                              "(relative to the study file), a Hugging Face id or \"organism\"")
        return str(candidate.resolve())
    if _HF_ID.match(model):
        return model
    top.fail("model", f"{_show(model)} is neither \"organism\", a Hugging Face id like "
                      "\"mlx-community/Qwen3-4B-4bit\", nor an existing model directory")


# ---------------------------------------------------------------------------------------------
# Storage URLs


def storage_url_for(config: StudyConfig, override: str | None = None) -> str:
    """The study's storage URL, or ``override`` (e.g. from ``--storage``) validated and made
    absolute; a relative SQLite path in ``override`` is relative to the working directory."""
    if override is None:
        return config.storage_url
    return _storage_url(override, Path.cwd(), where="--storage")


def _storage_url(url: str, base_dir: Path, where: str) -> str:
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////absolute.db: the path follows the third slash.
        database, _, query = rest[1:].partition("?") if rest.startswith("/") else ("", "", "")
        if not database or database == ":memory:":
            raise UserError(f"{where}: {url!r} names no database file; use sqlite:///PATH.db "
                            "(a relative PATH) or sqlite:////absolute/PATH.db")
        path = Path(database).expanduser()
        url = _sqlite_url(path if path.is_absolute() else base_dir / path)
        return f"{url}?{query}" if query else url
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        if not rest.strip("/"):
            raise UserError(f"{where}: {url!r} names no server; use postgresql://USER:PASSWORD@HOST/DATABASE")
        # psycopg 3 is the driver abopt installs; SQLAlchemy's plain scheme means psycopg2.
        return f"postgresql+psycopg://{rest}"
    raise UserError(f"{where}: unsupported storage URL {redact(url)!r}; "
                    f"use {' or '.join(STORAGE_SCHEMES)}")


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.expanduser().resolve()}"


# ---------------------------------------------------------------------------------------------
# Reading TOML with one-line errors


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a TOML file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        # tomllib (Python 3.11–3.13) puts the position only in the message: "... (at line 3, column 7)".
        match = re.match(r"^(.*) \(at line (\d+), column (\d+)\)$", message)
        if match:
            raise UserError(f"{path}: line {match[2]}, column {match[3]}: invalid TOML: {match[1]}") from None
        match = re.match(r"^(.*) \(at end of document\)$", message)
        if match:
            raise UserError(f"{path}: end of file: invalid TOML: {match[1]}") from None
        raise UserError(f"{path}: invalid TOML: {message}") from None


_MISSING: Any = object()


class _Table:
    """One TOML table of one file: typed reads that fail naming the file and the dotted key."""

    def __init__(self, path: Path, prefix: str, data: dict[str, Any]):
        self.path, self.prefix, self.data = path, prefix, data

    def dotted(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str) -> NoReturn:
        raise UserError(f"{self.path}: {self.dotted(key)}: {problem}")

    def check_keys(self, schema: dict[str, tuple[str, ...]]) -> None:
        """Reject keys this table may not have; ``schema`` maps every table of the file
        ("" = top level) to its keys, to point a key in the wrong table to the right one."""
        allowed = schema[self.prefix]
        for key in self.data:
            if key in allowed:
                continue
            home = next((table for table, keys in schema.items() if key in keys), None)
            if home == "":
                # TOML puts every key after a [table] header into that table.
                hint = "it belongs at the top of the file: move it above the first [table]"
            elif home is not None:
                hint = f"it belongs under [{home}]"
            else:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = (f"did you mean '{self.dotted(close[0])}'?" if close
                        else f"allowed keys here: {', '.join(allowed)}")
            raise UserError(f"{self.path}: unknown key '{self.dotted(key)}'; {hint}")

    def value(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            where = f" under [{self.prefix}]" if self.prefix else ""
            raise UserError(f"{self.path}: {self.dotted(key)}: missing; add it{where}")
        return default

    def table(self, key: str, optional: bool = False) -> _Table:
        data = self.value(key, {} if optional else _MISSING)
        if not isinstance(data, dict):
            self.fail(key, f"expected a table [{self.dotted(key)}], got {_show(data)}")
        return _Table(self.path, self.dotted(key), data)

    def string(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None,
               nonempty: bool = False) -> str:
        value = self.value(key, default)
        if not isinstance(value, str):
            self.fail(key, f"expected {_choices(choices) if choices else 'a string'}, got {_show(value)}")
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f"did you mean \"{close[0]}\"? " if close else ""
            self.fail(key, f"{_show(value)} is not allowed; {hint}use {_choices(choices)}")
        if nonempty and not value.strip():
            self.fail(key, "is empty; give a value")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.value(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def integer(self, key: str, default: Any = _MISSING, minimum: int = 0,
                maximum: int | None = None) -> int:
        value = self.value(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_show(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"at least {minimum}" if maximum is None else f"within [{minimum}, {maximum}]"
            self.fail(key, f"{value} is out of range; it must be {allowed}")
        return value

    def number(self, key: str, default: Any = _MISSING, minimum: float = -math.inf) -> float:
        value = self.value(key, default)
        if not _is_number(value):
            self.fail(key, f"expected a finite number, got {_show(value)}")
        if value < minimum:
            self.fail(key, f"{_format_number(value)} is out of range; it must be at least {minimum:g}")
        return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choices(choices: tuple[str, ...]) -> str:
    return " | ".join(f'"{c}"' for c in choices)


def _show(value: Any) -> str:
    """A TOML value as the user wrote it, with its type where the type may be the problem."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return _format_number(value) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return f"{json.dumps(value, ensure_ascii=False)} (a string)"
    if isinstance(value, list):
        return f"{json.dumps(value, default=str, ensure_ascii=False)} (an array)"
    if isinstance(value, dict):
        return "a table"
    return f"{value} (a {type(value).__name__})"  # TOML dates and times
