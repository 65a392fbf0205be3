"""The models file (YAML): which models the gateway serves and how to attach them.

```yaml
models:
  - name: qwen                      # what requests put in `model`
    aliases: [Qwen/Qwen2.5-1.5B-Instruct]
    model: /models/qwen2.5-1.5b     # path or HF id, as for `vllm serve`
    args: [--max-model-len, "8192"] # any other `vllm serve` arguments
    tp: 1
    devices: [cuda:0]               # optional pinning, rank order
    ttl: 600                        # idle seconds before detach; 0 or absent: never
    preload: true                   # attach when the gateway starts
    env: {VLLM_LOGGING_LEVEL: INFO}
    replicas: {min: 0, max: 3}      # optional: up to 3 instances (docs/scale.md)
    target_in_flight: 8             # requests in flight per replica before another one
```
"""

from __future__ import annotations

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

_NAME = r"^[A-Za-z0-9._/:-]+$"
REPLICA_SEP = ".r"  # `qwen.r2`: the second replica's instance name on a pool


class ModelsFileError(Exception):
    """The file cannot be used; the message names the entry and the field."""


class Replicas(BaseModel):
    """How many instances of the entry the gateway may run (over all its pools)."""
    model_config = ConfigDict(extra="forbid")

    min: int = Field(0, ge=0, le=64, description="kept even when idle; 0: scale to zero")
    max: int = Field(1, ge=1, le=64, description="at most this many instances")

    @model_validator(mode="after")
    def _order(self) -> "Replicas":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self


class ModelEntry(BaseModel):
    # Unknown keys are errors: a misspelt `tll:` must not silently mean "never".
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$",
                      description="served model name; also the pool instance's name")
    aliases: list[str] = Field(default_factory=list, description="other accepted names")
    model: str = Field(min_length=1, max_length=4096, description="model path or name")
    args: list[str] = Field(default_factory=list, description="other `vllm serve` arguments")
    tp: int = Field(1, ge=1, le=64)
    devices: list[str] | None = Field(None, description="pin to these devices, rank order")
    ttl: float | None = Field(None, ge=0, description="idle seconds before detach; 0: never")
    preload: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    replicas: Replicas = Field(default_factory=Replicas)
    target_in_flight: int = Field(8, ge=1, le=100000, description="requests in flight per "
                                  "replica before the gateway wants another replica")

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        import re

        for a in v:
            if not a or not re.match(_NAME, a):
                raise ValueError(f"alias {a!r} must match {_NAME}")
        return v

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, v):
        # YAML turns `8192` into an int; `vllm serve` arguments are strings.
        if isinstance(v, list):
            return [str(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a
                    for a in v]
        return v

    @property
    def names(self) -> list[str]:
        return [self.name, *self.aliases]

    def replica_names(self) -> list[str]:
        """The pool instance names of the entry's replicas on one pool: the entry's name,
        then `<name>.r2`, `<name>.r3`, ... (a gateway adopts any of them at start)."""
        return [self.name] + [f"{self.name}{REPLICA_SEP}{k}"
                              for k in range(2, self.replicas.max + 1)]

    @property
    def idle_ttl(self) -> float | None:
        return self.ttl or None

    def attach_args(self) -> list[str]:
        """The entry's args, plus `--served-model-name <name> <aliases...>` so the instance
        accepts every name a request may use, unless the entry sets it itself."""
        if any(a.split("=", 1)[0] == "--served-model-name" for a in self.args):
            return list(self.args)
        return [*self.args, "--served-model-name", *self.names]


class ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1)


def _where(loc: tuple, entries) -> str:
    """`models[1] (name 'b'), field 'tp'` from a pydantic error location."""
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        i = loc[1]
        name = None
        if isinstance(entries, list) and i < len(entries) and isinstance(entries[i], dict):
            name = entries[i].get("name")
        entry = f"entry {i + 1}" + (f" ({name!r})" if name else "")
        field = ".".join(str(p) for p in loc[2:])
        return f"{entry}, field {field!r}" if field else entry
    return "field " + repr(".".join(str(p) for p in loc))


def parse(text: str, source: str = "models file") -> list[ModelEntry]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ModelsFileError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ModelsFileError(f"{source}: expected a mapping with a `models:` list")
    try:
        parsed = ModelsFile.model_validate(data)
    except ValidationError as e:
        entries = data.get("models")
        lines = [f"{_where(tuple(err['loc']), entries)}: {err['msg']}" for err in e.errors()]
        raise ModelsFileError(f"{source}: " + "; ".join(lines)) from None
    seen: dict[str, str] = {}
    for i, entry in enumerate(parsed.models):
        for n in entry.names:
            if n in seen:
                raise ModelsFileError(
                    f"{source}: entry {i + 1} ({entry.name!r}), field "
                    f"{'name' if n == entry.name else 'aliases'!r}: {n!r} is already used "
                    f"by entry {seen[n]!r}")
            seen[n] = entry.name
    replica_names = {r: e.name for e in parsed.models for r in e.replica_names()[1:]}
    for i, entry in enumerate(parsed.models):
        if entry.name in replica_names:
            raise ModelsFileError(
                f"{source}: entry {i + 1} ({entry.name!r}), field 'name': {entry.name!r} is "
                f"a replica name of entry {replica_names[entry.name]!r}")
    return parsed.models


def load(path: str) -> list[ModelEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ModelsFileError(f"cannot read models file {path}: {e}") from None
    return parse(text, path)


def check_against_pool(entries: list[ModelEntry], devices: list[str], source: str,
                       check_args) -> None:
    """What only the pool can say: devices that exist, a TP that fits, arguments the
    pool owns. Checked at start, so a request never finds an entry that can't attach."""
    for i, e in enumerate(entries):
        where = f"{source}: entry {i + 1} ({e.name!r})"
        if e.tp > len(devices):
            raise ModelsFileError(f"{where}, field 'tp': {e.tp} is more than the pool's "
                                  f"{len(devices)} devices")
        if e.devices is not None:
            bad = [d for d in e.devices if d not in devices]
            if bad:
                raise ModelsFileError(f"{where}, field 'devices': {bad} not in the pool "
                                      f"(pool devices: {devices})")
            if len(e.devices) != e.tp or len(set(e.devices)) != e.tp:
                raise ModelsFileError(f"{where}, field 'devices': needs {e.tp} distinct "
                                      f"devices (tp={e.tp}), got {e.devices}")
        try:
            check_args(e.args, e.env)
        except Exception as err:  # the pool's AttachError: an argument the pool owns
            field = "env" if "environment" in str(err) else "args"
            raise ModelsFileError(f"{where}, field {field!r}: {err}") from None
