"""What runs inside a jobvisor child: queue client, runtime loop, registry, handlers.

Handlers see only this module's public names.
"""

from workers.context import Job, JobContext
from workers.errors import Cancelled, PayloadError, PermanentError, TransientError

__all__ = ["Cancelled", "Job", "JobContext", "PayloadError", "PermanentError", "TransientError"]
