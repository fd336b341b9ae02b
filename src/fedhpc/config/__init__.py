"""Typed configuration of a federation, its generated schema and docs, and the checks that need no task.

One dataclass per component (federation, strategy, trust), the field helper, the JSON-Schema and
Markdown generated from them and the checks that need no task. Imports only fedhpc.core.
"""
