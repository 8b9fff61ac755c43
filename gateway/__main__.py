"""`python -m gateway` is the same as the `voicegw` console script."""

from gateway.cli import main

raise SystemExit(main())
