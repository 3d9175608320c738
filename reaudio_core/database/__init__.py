"""The retrieval database: text-audio pairs, their embeddings, an index and a neighbour table.

Build one with ``reaudio index build --manifest CSV --out DIR`` (:func:`build_database`),
extend it with ``reaudio index add`` (:func:`add_to_database`), query it with
``reaudio retrieve`` (:meth:`Database.retrieve`).

The package, by job:

* :mod:`.manifest`: the manifest CSV format (:func:`read_manifest`) and ``reaudio manifest`` (:func:`write_manifest`);
* :mod:`.storage`: the layout on disk (versioned folders, ``CURRENT`` pointer, lock, atomic replacement, cleanup);
* :mod:`.neighbours`: the neighbour table (:class:`Neighbours`, :func:`exact_neighbours`);
* :mod:`.database`: :class:`Database`, a built database opened read-only (search, retrieve, feature caches);
* :mod:`.build`: :func:`build_database` and :func:`add_to_database`.

Every name other modules use is importable from ``reaudio_core.database`` itself.
"""
from .build import Report, add_to_database, audio_encoder_entry, build_database
from .database import KEYS, Database
from .manifest import CAPTION_COLUMNS, LABEL_COLUMNS, PATH_COLUMNS, read_manifest, write_manifest
from .neighbours import MODALITIES, Neighbours, exact_neighbours
from .storage import FORMAT, FORMAT_VERSION, LOCK, PAUSE_ENV, POINTER

# private names other modules use: the distributed build (reaudio_core/distributed.py), experiment.py, tests
from .build import _check_settings, _embed_rows  # noqa: F401
from .database import _component  # noqa: F401
from .storage import _check_out_dir  # noqa: F401

__all__ = ["CAPTION_COLUMNS", "Database", "FORMAT", "FORMAT_VERSION", "KEYS", "LABEL_COLUMNS", "LOCK", "MODALITIES",
           "Neighbours", "PATH_COLUMNS", "PAUSE_ENV", "POINTER", "Report", "add_to_database", "audio_encoder_entry",
           "build_database", "exact_neighbours", "read_manifest", "write_manifest"]
