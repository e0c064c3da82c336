"""Study settings as data: building a study's spec (a dataclass) from a mapping, and checking it.

Every study module has one spec class (``DSISpec``, ``BoVWSpec``, ...): plain values and nested config
dataclasses (``TrainConfig`` for indexing and fine-tuning, :class:`ModelSpec` for the architecture), whose
defaults are the study's defaults. :func:`build_spec` makes one from

* a recipe's mapping (lower_case keys, nested sections: ``index: {epochs: 400, lr: 1.0e-3}``); a nested
  section is laid over the spec's default for it, so a recipe names only what it changes;
* a notebook profile (UPPER_CASE keys, :func:`spec_from_profile`), through the spec's ``PROFILE_KEYS``.

Unknown keys and values of the wrong type are refused with a one-line :class:`SpecError` that names the
key and the allowed ones. :func:`set_value` applies a ``--set key=value`` override, :func:`spec_to_dict`
turns a spec back into plain data (``vitdsi run --dry-run`` prints it as YAML).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from vitdsi_utils.data.images import SOURCES, ImageSet, load_images
from vitdsi_utils.training.config import check_int, check_number


class SpecError(ValueError):
    """A bad recipe, profile or override: one line naming the key, what it got and what is allowed."""


# ------------------------------------------------------------------------------------------
# The architecture section shared by the studies
# ------------------------------------------------------------------------------------------
POS_ENCODINGS = ("sinusoidal", "learned", "conditional")


POOLINGS = ("mean", "cls")


@dataclass
class ModelSpec:
    """Architecture settings a study sets on its models; None leaves the model's own default.

    :meth:`overrides` is the ``model_overrides`` mapping of the study functions (only the fields set,
    in this order), e.g. ``{"patch_size": 8, "dropout": 0.1, "pos_encoding": "sinusoidal"}``.
    """

    patch_size: int | None = None
    dim: int | None = None
    mlp_dim: int | None = None
    depth: int | None = None
    heads: int | None = None
    dropout: float | None = None
    pos_encoding: str | None = field(default=None, metadata={"choices": POS_ENCODINGS})
    pooling: str | None = field(default=None, metadata={"choices": POOLINGS})  # the dense encoder's only

    #: notebook profile keys of the architecture -> spec keys (the spec's ``model`` field; the dense studies
    #: add their own key for ``pooling``)
    PROFILE_KEYS = {
        "PATCH_SIZE": "model.patch_size",
        "DIM": "model.dim",
        "MLP_DIM": "model.mlp_dim",
        "DEPTH": "model.depth",
        "HEADS": "model.heads",
        "DROPOUT": "model.dropout",
        "POS_ENCODING": "model.pos_encoding",
    }

    def __post_init__(self) -> None:
        check_choices(self)

    def overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass
class ImageSourceSpec:
    """The images a study reads, shared by the studies' specs: where they come from and what reports call them."""

    source: str = field(default="imagenette", metadata={"choices": SOURCES})
    root: str | None = None  # an ImageFolder tree (source folder), an Imagenette copy, COCO images
    annotations: str | None = None  # COCO instances JSON (source coco)
    name: str | None = None  # what the reports call the data (a profile's study only; null: dataset_name's default)

    #: settings only a notebook profile's study reads: a recipe that sets them is refused
    #: (:func:`refuse_profile_only`; a study's spec with more lists them all)
    PROFILE_ONLY = ("name",)

    #: notebook profile keys -> spec keys (a study's spec adds its own to these)
    PROFILE_KEYS = {
        "DATASET": "source",
        "DATASET_ROOT": "root",
        "DATASET_ANNOTATIONS": "annotations",
        "DATASET_NAME": "name",
    }


def dsi_model(**values: Any) -> ModelSpec:
    """The DSI studies' default architecture settings: the paper's patch, dropout and positions."""
    return ModelSpec(**{"patch_size": 16, "dropout": 0.1, "pos_encoding": "sinusoidal", **values})


def full_model(**values: Any) -> ModelSpec:
    """Every size setting of the paper's model (the scale and incremental studies set them all)."""
    return ModelSpec(**{"patch_size": 16, "dim": 128, "mlp_dim": 256, "depth": 6, "heads": 4, "dropout": 0.1, **values})


def check_choices(spec: Any) -> None:
    """Refuse a field value outside its ``choices`` (field metadata); tuples are checked item by item."""
    for f in dataclasses.fields(spec):
        choices = f.metadata.get("choices")
        value = getattr(spec, f.name)
        if choices is None or value is None:
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if item not in choices:
                raise SpecError(f"{f.name}: {item!r} is not one of {', '.join(map(str, choices))}")


def no_pooling(spec: Any) -> None:
    """The DSI's encoder has no pooling setting (that is the dense encoder's)."""
    if spec.model.pooling is not None:
        raise SpecError("model.pooling: the DSI has no pooling setting (it is the dense encoder's); remove it")


#: The range of the studies' own numeric settings, by field name: (integer?, low, high, low excluded,
#: high excluded); None values are not checked, lists item by item. The configs (TrainConfig,
#: DenseTrainConfig, SSLConfig, the model's) check their own fields.
RANGES: dict[str, tuple[bool, float | None, float | None, bool, bool]] = {
    **{
        name: (True, 1, None, False, False)
        for name in (
            "max_pairs_per_query",
            "finetune_epochs",
            "words",
            "vlad_words",
            "vocabularies",
            "queries",
            "query_batch",
            "repeats",
            "k",
            "depths",
        )
    },
    **{name: (True, 0, None, False, False) for name in ("index_views", "consolidate")},
    "mix_ratio": (False, 0, None, True, False),
    "view_min_crop": (False, 0, 1, True, False),
    "new_fraction": (False, 0, 1, True, True),
    "replay_ratios": (False, 0, None, False, False),
}


def check_ranges(spec: Any) -> None:
    """Refuse a value of :data:`RANGES` outside its range: SpecError naming the field, the range and the value."""
    for f in dataclasses.fields(spec):
        rule = RANGES.get(f.name)
        value = getattr(spec, f.name)
        if rule is None or value is None:
            continue
        integer, low, high, low_open, high_open = rule
        for item in value if isinstance(value, (tuple, list)) else (value,):
            try:
                if integer:
                    check_int("", item, int(low))
                else:
                    check_number("", item, low, high, low_open=low_open, high_open=high_open)
            except ValueError as error:
                raise SpecError(f"{f.name}: {error}") from None


# ------------------------------------------------------------------------------------------
# Building a spec from a mapping
# ------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _describe(kind: Any) -> str:
    """A type as a reader of a recipe names it: 'an integer', 'a list of numbers', ..."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return "anything"
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in arms)
        return text + (" or null" if len(arms) < len(args) else "")
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return f"a mapping of {_describe(args[1]).removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(kind):
        return f"a mapping ({kind.__name__} settings)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text"}.get(kind, kind.__name__)


class _Refused(Exception):
    """A value that does not fit a type; the caller names the key."""


def _coerce(value: Any, kind: Any, key: str, base: Any = None) -> Any:
    """``value`` as ``kind`` (lists become tuples, integers numbers, mappings dataclasses), or _Refused."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key, base if dataclasses.is_dataclass(arm) else None)
            except _Refused:
                continue
            # a SpecError inside a section of this arm is the real message: let it through
        raise _Refused
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, Mapping):
            raise _Refused
        return build_spec(kind, value, base=base if isinstance(base, kind) else None, prefix=f"{key}.")
    if origin in (tuple, list):
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # one value is a list of one
        item_kind = args[0]
        return tuple(_coerce(v, item_kind, key) for v in items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Refused
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _Refused
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Refused
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Refused
    if kind is str:
        if isinstance(value, str):
            return value
        raise _Refused
    if isinstance(kind, type) and isinstance(value, kind):
        return value
    raise _Refused


def build_spec(cls: type, values: Mapping[str, Any], *, base: Any = None, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from ``values``, laid over ``base`` (default: ``cls()``'s defaults).

    Nested dataclass fields take a mapping that is laid over the base's value of that field (or the
    dataclass's own defaults when the base has None there). A key ``cls`` lacks, or a value of the
    wrong type, raises :class:`SpecError` naming the key (``prefix`` + name) and what is allowed.
    """
    if not isinstance(values, Mapping):
        raise SpecError(f"{prefix.rstrip('.') or 'the settings'} must be a mapping of keys to values, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [str(k) for k in values if k not in fields]
    if unknown:
        raise SpecError(
            f"unknown key {prefix}{unknown[0]!s}; allowed{' in ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(sorted(fields))
        )
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        current = getattr(base, name) if base is not None else _default(f)
        if name not in values:
            if current is not dataclasses.MISSING:
                kwargs[name] = current
            continue
        kind = hints[name]
        section = current if current is not dataclasses.MISSING and current is not None else _blank(kind)
        try:
            kwargs[name] = _coerce(values[name], kind, prefix + name, section)
        except _Refused:
            value = values[name]
            raise SpecError(
                f"{prefix}{name}: expected {_describe(kind)}, got {value!r} ({type(value).__name__})"
                + _yaml_hint(value, kind)
            ) from None
    try:
        spec = cls(**kwargs)
        check_ranges(spec)
        return spec
    except SpecError as error:
        if prefix and not str(error).startswith(prefix):
            raise SpecError(f"{prefix}{error}") from None
        raise
    except (ValueError, TypeError) as error:
        text = str(error)
        # a config's own range check names its field first ("lr must be > 0, got 0"): name it as the recipe does
        name = next((f for f in fields if text.startswith(f"{f} must ")), None)
        if name is not None:
            raise SpecError(f"{prefix}{name}: {text[len(name) + 1 :]}") from None
        where = prefix.rstrip(".") or cls.__name__
        raise SpecError(f"{where}: {error}") from None


def _blank(kind: Any) -> Any:
    """The defaults of the dataclass in ``kind`` (also inside ``X | None``), the base of a section set from None."""
    arms = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    for arm in arms:
        if dataclasses.is_dataclass(arm):
            return arm()
    return None


def _yaml_hint(value: Any, kind: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return "; write the number without quotes"
    return ""


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A spec as plain data (nested sections as mappings, tuples as lists): what :func:`build_spec` reads back."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(spec)


# ------------------------------------------------------------------------------------------
# YAML (numbers as in YAML 1.2: 1e-3 is a number) and --set overrides
# ------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-3 and 5E4 as numbers (YAML 1.1 wants 1.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text as plain data, with 1e-3 read as a number."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` (``value`` in YAML: 3, 1e-3, true, null, [512, 1024], {patch: [8]}) as (key, value)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise SpecError(f"--set takes KEY=VALUE, e.g. --set index.epochs=10 or --set ns=[512]; got {item!r}")
    try:
        return key, load_yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise SpecError(f"--set {key}: {text!r} is not a YAML value ({str(error).splitlines()[0]})") from None


def set_value(values: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``values`` with the dotted ``key`` (e.g. ``index.epochs``) set to ``value``."""
    out = dict(values)
    head, _, rest = key.partition(".")
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    if inner is None:
        inner = {}
    if not isinstance(inner, Mapping):
        raise SpecError(f"--set {key}: {head} is {inner!r}, not a section with keys")
    out[head] = set_value(dict(inner), rest, value)
    return out


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------
# Notebook profiles: UPPER_CASE keys
# ------------------------------------------------------------------------------------------
def spec_from_profile(cls: type, params: Mapping[str, Any], *, ignore_unknown: bool = False) -> Any:
    """A spec from a notebook profile's UPPER_CASE parameters, through ``cls.PROFILE_KEYS``.

    ``PROFILE_KEYS`` maps a profile key to the spec key(s) it sets (dotted for sections, e.g. ``LR`` ->
    ``("index.lr", "fine_tune.lr")``; a trailing ``[0]`` takes the first item of a list, e.g. ``SEEDS`` ->
    ``seed[0]``). A profile key the spec does not use is refused, unless ``ignore_unknown`` (a whole
    profile holds every notebook's keys); a value of the wrong type is refused naming the profile key.
    """
    mapping: dict[str, tuple[str, ...]] = {
        k: (v,) if isinstance(v, str) else tuple(v) for k, v in getattr(cls, "PROFILE_KEYS", {}).items()
    }
    unknown = [k for k in params if k not in mapping]
    if unknown and not ignore_unknown:
        raise SpecError(
            f"profile key {unknown[0]} is not used by {cls.__name__}; allowed: " + ", ".join(sorted(mapping))
        )
    values: dict[str, Any] = {}
    for key, targets in mapping.items():
        if key not in params:
            continue
        for target in targets:
            value = params[key]
            if target.endswith("[0]"):
                target = target[:-3]
                if isinstance(value, (list, tuple)):
                    if not value:
                        raise SpecError(f"profile key {key}: expected a non-empty list, got {value!r}")
                    value = value[0]
            values = set_value(values, target, value)
    try:
        return build_spec(cls, values)
    except SpecError as error:
        message = str(error)
        for key, targets in mapping.items():
            for target in targets:
                target = target.removesuffix("[0]")
                if message.startswith(f"{target}:") and key in params:
                    raise SpecError(f"profile key {key} ({message})") from None
        raise


def profile_only(spec: Any) -> list[str]:
    """The fields of ``spec``'s ``PROFILE_ONLY`` (settings only a notebook profile's study reads) set away from their defaults."""
    fields = {f.name: f for f in dataclasses.fields(spec)}
    return [name for name in getattr(spec, "PROFILE_ONLY", ()) if getattr(spec, name) != _default(fields[name])]


def refuse_profile_only(spec: Any) -> None:
    """SpecError naming the first :func:`profile_only` setting: a recipe's run of the study would not read it."""
    changed = profile_only(spec)
    if changed:
        raise SpecError(f"{changed[0]}: read by a notebook profile's study only, not by a recipe; remove it")


def notebook_spec(cls: type, namespace: Mapping[str, Any]) -> Any:
    """The spec of a notebook's study from its namespace (``globals()``): its UPPER_CASE names are the profile's keys.

    Names the spec does not use (other notebooks' keys, ``OUT_DIR``, ...) are left out, as by
    :func:`spec_from_profile` with ``ignore_unknown``.
    """
    params = {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_")}
    return spec_from_profile(cls, params, ignore_unknown=True)


def require_profile(paths: Any, notebook: str) -> None:
    """SpecError unless ``paths`` are a notebook profile's (:meth:`~vitdsi_utils.runs.StudyPaths.create`).

    The phases of a profile's study (notebooks 03-05) read and write the shared run folders and tables
    of that profile; a recipe runs the whole study instead (``study: dsi``).
    """
    if getattr(paths, "profile", None) is None:
        raise SpecError(
            f"{notebook} is one phase of a notebook profile's study: give it StudyPaths.create(profile), "
            "or run the whole DSI study from a recipe (study: dsi)"
        )


def spec_images(spec: Any) -> ImageSet:
    """The images of a notebook profile's study: ``spec``'s source at its size, named as its reports call the
    data (``spec.name``, else :func:`~vitdsi_utils.data.images.dataset_name`'s default), without a progress bar."""
    return load_images(
        spec.source, spec.size, root=spec.root, annotations=spec.annotations, name=spec.name, progress=False
    )
