import sys

from supervisor_app.cli.main import main

sys.exit(main())
