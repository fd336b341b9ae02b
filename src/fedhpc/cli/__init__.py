"""The `fedhpc` command line: parse arguments, call one stage or operation, print.

No stage logic of its own. Besides the verbs, it holds the warm process (`warm`), a fork server
on the head's host that runs the jobs' `fedhpc` commands with torch already imported, and its
client (`handoff`), through which the executable (`entry`) hands a command to it.
"""
