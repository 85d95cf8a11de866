"""What runs inside a jobvisor child: queue client, runtime loop, registry, handlers.

Handlers see only this module's public names.
"""

from workers.core.context import Job, JobContext
from workers.core.errors import Cancelled, PayloadError, PermanentError, TransientError

__all__ = ["Cancelled", "Job", "JobContext", "PayloadError", "PermanentError", "TransientError"]
