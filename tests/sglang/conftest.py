import sys
from pathlib import Path

# sglang_helpers.py and sglang_host_pool.py sit beside the tests; redis_server.py one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
