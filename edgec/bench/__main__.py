from edgec.bench import main

raise SystemExit(main())
