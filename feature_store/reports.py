"""Plain result records of FeatureStore.ls / verify / gc."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class FeatureSetInfo:
    """One feature set (one backbone fingerprint) as `FeatureStore.ls` sees it."""

    fingerprint: str
    backbone: str | None
    engine: str | None
    dim: int | None
    rows: int            # distinct keys readable
    shards: int          # committed shards that pass their header/key checks
    bytes: int           # size of those shards on disk
    created: str | None  # meta.json creation time (ISO 8601, UTC)
    updated: str | None  # newest shard's modification time
    problems: int = 0    # temp files + shards that fail their checks (see verify / gc)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyReport:
    """Every committed shard of one feature set read back and checked against its checksums."""

    fingerprint: str
    dim: int | None = None
    rows: int = 0                                        # distinct keys in good shards
    duplicate_rows: int = 0                              # rows repeated across good shards
    ok_shards: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)  # path -> what is wrong
    temp_files: list[str] = field(default_factory=list)   # in-flight or abandoned writes
    meta_problem: str | None = None

    @property
    def ok(self) -> bool:
        return not self.corrupt and self.meta_problem is None

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class GcReport:
    """What `FeatureStore.gc` removed (or, with dry_run, would remove)."""

    dry_run: bool
    removed_sets: list[str] = field(default_factory=list)     # fingerprints not kept / emptied
    removed_temp: list[str] = field(default_factory=list)     # abandoned temp files
    removed_corrupt: list[str] = field(default_factory=list)  # shards failing their checks
    compacted: dict[str, str] = field(default_factory=dict)   # fingerprint -> new shard path
    removed_keys: int = 0                                      # rows dropped by keep_keys
    bytes_freed: int = 0                                       # before compaction rewrites

    def to_dict(self) -> dict:
        return asdict(self)
