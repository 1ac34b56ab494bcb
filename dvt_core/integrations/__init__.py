"""Integrations with other systems, each imported only when used (``dvt_core.integrations.ray``: the ``ray`` extra)."""
