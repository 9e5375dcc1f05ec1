from lora_worker.cli import main

raise SystemExit(main())
