"""The ``auth`` filter: virtual keys, each resolved to a :class:`llmproxy.Principal`.

See :mod:`llmproxy.filters.auth.filter` (the filter and its config),
:mod:`~llmproxy.filters.auth.keys` (hashes, key ids, the key table) and
:mod:`~llmproxy.filters.auth.credential` (finding the key in a request head).
"""

from llmproxy.filters.auth.filter import AuthFactory, AuthFilter
from llmproxy.filters.auth.keys import hash_key, key_id, new_key

__all__ = ["AuthFactory", "AuthFilter", "hash_key", "key_id", "new_key"]
