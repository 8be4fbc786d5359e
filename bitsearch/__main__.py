from bitsearch.cli import main

raise SystemExit(main())
