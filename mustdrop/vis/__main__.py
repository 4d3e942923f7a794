from .slides import main

raise SystemExit(main())
