from modelfleet.cli import main

raise SystemExit(main())
