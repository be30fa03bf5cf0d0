"""A hostile LLM upstream: odd-but-possible answers of the Anthropic and OpenAI APIs, one per case.

`cases` is the corpus (a table), `shapes` the real bodies and headers it is
made of, `wire` the raw HTTP/1.1 server that sends them byte for byte and
records every request. `python -m bench.nasty_upstream --port 0` runs it.
"""

from .cases import ALL, BROKEN, CASES, HELPERS, NO_HEAD, RELAYED, STORED, Answer, Case
from .wire import NastyUpstream

__all__ = ["ALL", "BROKEN", "CASES", "HELPERS", "NO_HEAD", "RELAYED", "STORED", "Answer", "Case", "NastyUpstream"]
