"""Stage one of the pipeline: class descriptions, cached as JSONL.

In pipeline order:

- :mod:`.queries`: what is asked of an LLM (queries) and the offline templates;
- :mod:`.llm_client`: the OpenAI-compatible client adapter, the one counted retry loop (imported
  only when a run needs it), with :mod:`.transport` (reachability, which failures are retried,
  backoff) and :mod:`.answers` (raw answers cleaned into one-sentence descriptions);
- :mod:`.redaction`: keeping the API key out of everything printed or logged;
- :mod:`.planning`: a run's settings, checked, and its units (class x query);
- :mod:`.generation`: the resumable run (:func:`generate`);
- :mod:`.cache_format`: one line and one unit of the JSONL cache, written and checked;
- :mod:`.cache_reader`: reading the cache (crash-damaged tail skipped, repeats kept as samples);
- :mod:`.cache`: writing the cache (one unit per write, crash repair, the writer lock);
- :mod:`.cupl`: CuPL's JSON format, its import, and CuPL's own release folder with its key map;
- :mod:`.matching`: matching wanted class names to a source's keys.

Everything here is text only: importing this package loads neither torch nor the ``openai`` client.
"""

from __future__ import annotations

from .cache import DescriptionLockError, append_descriptions, repair_torn_tail, writer_lock
from .cache_format import Description, DescriptionFileError, DescriptionFileMissing, normalize_classname
from .cache_reader import CacheContents, read_cache, read_descriptions, read_records
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
from .generation import RunReport, generate
from .matching import ClassMatch, match_classnames
from .planning import GenConfig, GenerationError
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
