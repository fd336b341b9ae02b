"""Foundations every other package stands on.

Input errors, crash-safe files, the run layout (the blackboard's paths), the JSON document
schemas and tensor files read and written by range. Imports nothing else from fedhpc.
"""
