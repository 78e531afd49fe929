"""`python -m mmadapt`, so `accelerate launch -m mmadapt train RECIPE` works."""
import sys

from mmadapt.cli import main

sys.exit(main())
