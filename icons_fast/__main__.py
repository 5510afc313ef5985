from icons_fast.cli import main

raise SystemExit(main())
