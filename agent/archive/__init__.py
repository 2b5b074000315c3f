"""The raw archive: closed months of raw messages sealed per station into compressed,
content-hashed segment files with a manifest in the agent database, and read back with
the live `raw` table as one (issue 13).

- agent/archive/schema.py: ARCHIVE_DDL (the manifest tables), ensure_schema, has_archive
- agent/archive/segment.py: the segment file format (writer, streaming reader)
- agent/archive/seal.py: seal(store, …): closed months into segments, rows out of `raw`
- agent/archive/reader.py: ArchiveReader: iter_raw_keys over archive and live, counts
- agent/archive/index.py: archive_dir, segments, archived_keys (the duplicate rule)
"""

from agent.archive.index import (
    Segment,
    archive_dir,
    archived_count,
    archived_keys,
    archived_sids,
    archived_top,
    segment_of,
    segments,
)
from agent.archive.reader import ArchiveReader, iter_raw_keys, snapshot
from agent.archive.schema import ensure_schema, has_archive
from agent.archive.seal import DEFAULT_GRACE_DAYS, SealReport, first_open_month, month_of, seal
from agent.archive.segment import DEFAULT_LEVEL, FORMAT, ArchiveError, read_segment
from agent.store.sql import ARCHIVE_DDL

__all__ = [
    "ARCHIVE_DDL",
    "DEFAULT_GRACE_DAYS",
    "DEFAULT_LEVEL",
    "FORMAT",
    "ArchiveError",
    "ArchiveReader",
    "SealReport",
    "Segment",
    "archive_dir",
    "archived_count",
    "archived_keys",
    "archived_sids",
    "archived_top",
    "ensure_schema",
    "first_open_month",
    "has_archive",
    "iter_raw_keys",
    "month_of",
    "read_segment",
    "seal",
    "snapshot",
    "segment_of",
    "segments",
]
