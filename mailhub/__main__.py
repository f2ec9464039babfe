from mailhub.cli.main import main

raise SystemExit(main())
