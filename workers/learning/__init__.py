"""The learning pipeline (pdf → vision → feedback): jobvisor's first plug-in.

It plugs in through the public mechanisms any package uses (workers.core.plugins).
"""
