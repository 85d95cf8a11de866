import sys

from supervisor_app.cli import main

sys.exit(main())
