"""The output folder of a distributed job: Parquet parts written atomically, a manifest, resumption.

Layout of ``out_dir``::

    scores/part-<run>-<n>.parquet   the rows (read the folder as one table: read_scores(out_dir))
    manifest.json                   detector, columns, parts with their row counts, complete: true/false
    workers/<host>-<pid>.json       per worker process: images scored, seconds, peak memory
    overlays/, maps/                PNGs, when asked for

A part is written to a hidden temporary file and renamed into place, so a part file either holds all
its rows or does not exist: a job killed at any moment leaves only whole parts (and perhaps a stale
temporary file, deleted on the next start). The part files are the truth; the manifest is rewritten
(atomically too) after each part and says whether the job finished (``complete``). A job restarted
with the same ``out_dir`` reads the ``path`` column of the parts already there and scores only the
other inputs, so nothing is scored twice; the manifest records the detector's checksum, and an output
folder of another detector (or with other columns) is refused rather than mixed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from vlad.errors import DistributedError

logger = logging.getLogger(__name__)

SCORES_DIR = "scores"
WORKERS_DIR = "workers"
MANIFEST_FILE = "manifest.json"
FORMAT = "vlad-scores"
FORMAT_VERSION = 1


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_scores(out_dir: str | os.PathLike):
    """Every row written so far to ``out_dir`` by :func:`vlad.distributed.score`, as a pyarrow Table
    (``.to_pandas()`` for a DataFrame), sorted by path.

    Raises:
        DistributedError: ``out_dir`` holds no scores.
    """
    import pyarrow.parquet as pq

    folder = Path(out_dir) / SCORES_DIR
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not parts:
        raise DistributedError(f"{out_dir}: no scores written there (no {SCORES_DIR}/part-*.parquet); run "
                               "vlad.distributed.score (or `vlad score --engine ray`) with this output folder")
    table = pq.ParquetDataset([str(p) for p in parts]).read()
    return table.sort_by("path")


class OutputFolder:
    """Writes the parts and the manifest of one job; knows what an earlier run already wrote.

    Args:
        out_dir: the output folder (created if missing).
        detector: the detector folder and the sha256 of its ``detector.json`` (its identity).
        schema: the pyarrow schema of the rows.
    """

    def __init__(self, out_dir: str | os.PathLike, detector: tuple[str, str], schema) -> None:
        self.root = Path(out_dir)
        self.detector_dir, self.detector_sha256 = detector
        self.schema = schema
        self.parts: list[dict[str, Any]] = []
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._seq = 0

    @property
    def scores_dir(self) -> Path:
        return self.root / SCORES_DIR

    def open(self) -> set[str]:
        """Prepare the folder; returns the paths already written by earlier runs (to skip).

        Raises:
            DistributedError: the folder holds the output of another detector, other columns, or a part
                file that cannot be read.
        """
        import pyarrow.parquet as pq

        self.scores_dir.mkdir(parents=True, exist_ok=True)
        (self.root / WORKERS_DIR).mkdir(exist_ok=True)
        manifest = self.root / MANIFEST_FILE
        if manifest.exists():
            self._check_manifest(manifest)
        for stale in self.scores_dir.glob(".part-*.tmp"):
            stale.unlink(missing_ok=True)  # a part being written when an earlier run was killed
        done: set[str] = set()
        for part in sorted(self.scores_dir.glob("part-*.parquet")):
            try:
                pf = pq.ParquetFile(part)
                columns = pf.schema_arrow.names
                paths = pf.read(columns=["path"]).column("path").to_pylist()
            except Exception as exc:  # noqa: BLE001 - any unreadable part is reported the same way
                raise DistributedError(f"{part}: cannot be read ({exc}); it was not written by vlad or was changed "
                                       "afterwards: delete it and run again to score its images anew") from None
            if columns != self.schema.names:
                raise DistributedError(
                    f"{self.root}: holds scores with other columns ({', '.join(columns)}) than this job writes "
                    f"({', '.join(self.schema.names)}); use a new output folder, or the same overlay/map options "
                    "as the first run")
            self.parts.append({"file": f"{SCORES_DIR}/{part.name}", "rows": len(paths)})
            done.update(paths)
        if done:
            logger.info("%s: %d images already scored by an earlier run; skipping them", self.root, len(done))
        self._write_manifest(complete=False)
        return done

    def _check_manifest(self, manifest: Path) -> None:
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DistributedError(f"{manifest}: not a manifest vlad can read ({exc}); use a new output folder "
                                   "or delete that one") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DistributedError(f"{manifest}: not written by vlad.distributed; use a new output folder")
        if doc.get("detector_sha256") != self.detector_sha256:
            raise DistributedError(
                f"{self.root}: holds scores of another detector ({doc.get('detector')}, detector.json sha256 "
                f"{str(doc.get('detector_sha256'))[:12]}...), not of {self.detector_dir}; mixing them would "
                "give scores on different scales: use a new output folder, or delete that one to start again")

    def _write_manifest(self, complete: bool) -> None:
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "detector": self.detector_dir,
               "detector_sha256": self.detector_sha256, "columns": self.schema.names,
               "rows": sum(p["rows"] for p in self.parts), "parts": self.parts, "complete": complete}
        _atomic_write_text(self.root / MANIFEST_FILE, json.dumps(doc, indent=2))

    def write_part(self, table) -> Path:
        """Write rows as one new part file (atomically), then record it in the manifest."""
        import pyarrow.parquet as pq

        table = table.cast(self.schema) if table.schema != self.schema else table
        name = f"part-{self.run_id}-{self._seq:06d}.parquet"
        self._seq += 1
        target = self.scores_dir / name
        tmp = self.scores_dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, target)
        self.parts.append({"file": f"{SCORES_DIR}/{name}", "rows": table.num_rows})
        self._write_manifest(complete=False)
        return target

    def finish(self) -> None:
        """Mark the job complete in the manifest (every input has its row)."""
        self._write_manifest(complete=True)

    def worker_stats(self, since: float = 0.0) -> list[dict[str, Any]]:
        """What each worker process reported (``workers/*.json``, those written after the time ``since``):
        host, pid, threads, images, seconds, load_seconds, peak_rss_mb."""
        stats = []
        for f in sorted((self.root / WORKERS_DIR).glob("*.json")):
            try:
                if f.stat().st_mtime < since:
                    continue  # a worker of an earlier run
                stats.append(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue  # being rewritten right now: the next read sees it
        return stats


class PartBuffer:
    """Collects rows arriving from the workers and writes a part every ``rows_per_part`` rows or
    ``seconds`` seconds, whichever comes first (few files for a large archive, little lost work when a
    job is killed)."""

    def __init__(self, folder: OutputFolder, rows_per_part: int = 1000, seconds: float = 60.0) -> None:
        self.folder, self.rows_per_part, self.seconds = folder, rows_per_part, seconds
        self._tables: list = []
        self._rows = 0
        self._since = time.monotonic()
        self.written: set[str] = set()
        self.errors = 0

    def add(self, table) -> int:
        """Queue a batch of rows; drops any path already written in this job. Returns the rows kept."""
        import pyarrow as pa
        import pyarrow.compute as pc

        paths = table.column("path").to_pylist()
        repeated = [p in self.written for p in paths]
        if any(repeated):  # Ray hands each block out once; kept as a guard for the exactly-once promise
            logger.warning("dropping %d rows scored twice", sum(repeated))
            table = table.filter(pa.array([not r for r in repeated]))
            paths = [p for p, r in zip(paths, repeated) if not r]
        self.written.update(paths)
        self.errors += int(pc.sum(pc.is_valid(table.column("error"))).as_py() or 0)
        self._tables.append(table)
        self._rows += table.num_rows
        if self._rows >= self.rows_per_part or time.monotonic() - self._since >= self.seconds:
            self.flush()
        return table.num_rows

    def flush(self) -> None:
        """Write what is queued as one part."""
        import pyarrow as pa

        if self._rows:
            self.folder.write_part(pa.concat_tables(self._tables, promote_options="permissive"))
        self._tables, self._rows, self._since = [], 0, time.monotonic()
