import sys

from vlad.bench import main

sys.exit(main())
