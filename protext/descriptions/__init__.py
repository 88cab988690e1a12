"""Stage one of the pipeline: class descriptions, cached as JSONL.

- :mod:`.cache`: the JSONL description cache (units, crash repair, the writer lock, reading with
  repeats kept as samples);
- :mod:`.cupl`: CuPL's JSON format, its import, and CuPL's own release folder with its key map;
- :mod:`.matching`: matching wanted class names to a source's keys;
- :mod:`.queries`: what is asked of an LLM (queries) and the offline templates;
- :mod:`.generation`: the resumable generation engine (:func:`generate`);
- :mod:`.llm_client`: the OpenAI-compatible client adapter (imported only when a run needs it).

Everything here is text only: importing this package loads neither torch nor the ``openai`` client.
"""

from __future__ import annotations

from .cache import (
    CacheContents,
    Description,
    DescriptionFileError,
    DescriptionFileMissing,
    DescriptionLockError,
    append_descriptions,
    normalize_classname,
    read_cache,
    read_descriptions,
    read_records,
    repair_torn_tail,
    writer_lock,
)
from .cupl import (
    DescriptionOutputError,
    ImportSummary,
    ReleaseKeyError,
    import_cupl,
    import_descriptions,
    load_cupl_json,
    read_release,
    release_descriptions,
)
from .generation import GenConfig, GenerationError, RunReport, generate
from .matching import ClassMatch, match_classnames
from .queries import QueryFileError

__all__ = [
    "CacheContents",
    "ClassMatch",
    "Description",
    "DescriptionFileError",
    "DescriptionFileMissing",
    "DescriptionLockError",
    "DescriptionOutputError",
    "GenConfig",
    "GenerationError",
    "ImportSummary",
    "QueryFileError",
    "ReleaseKeyError",
    "RunReport",
    "append_descriptions",
    "generate",
    "import_cupl",
    "import_descriptions",
    "load_cupl_json",
    "match_classnames",
    "normalize_classname",
    "read_cache",
    "read_descriptions",
    "read_records",
    "read_release",
    "release_descriptions",
    "repair_torn_tail",
    "writer_lock",
]
