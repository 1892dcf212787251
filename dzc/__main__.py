from dzc.cli import main

raise SystemExit(main())
