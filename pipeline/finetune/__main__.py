import sys

from pipeline.finetune.cli import main

sys.exit(main())
