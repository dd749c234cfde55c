"""`python -m benchmarks.workloads --kind rag --seed 0 --n 100 --out file.jsonl` (see __init__)."""
import sys

from . import main

sys.exit(main())
