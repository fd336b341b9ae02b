"""The `fedhpc` command line: parse arguments, call one stage or operation, print. No logic of
its own.
"""
