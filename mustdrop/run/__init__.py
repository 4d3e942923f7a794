"""The run machinery every model family shares: prefill state and stage-2 hooks (prefill), the
per-method decision points (decisions), stage-3 KV trim (kv), decode loop and sampling (decode),
text-row scoring (textrows), prompt handling (prompt), trace assembly (record) and the runner that
strings them together around a host (runner). What differs per family is in ``mustdrop.hosts``."""
