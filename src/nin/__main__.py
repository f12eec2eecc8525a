from nin.cli import main

raise SystemExit(main())
