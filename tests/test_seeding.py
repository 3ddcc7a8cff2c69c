from __future__ import annotations

import subprocess
import sys

from forgetkit.seeding import stable_hash


def test_stable_hash_ignores_hash_seed():
    code = "from forgetkit.seeding import stable_hash; print(stable_hash({'b': 1, 'a': [1, 2]}))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": s, "PATH": ""}).stdout.strip()
            for s in ("1", "2")}
    assert outs == {stable_hash({"a": [1, 2], "b": 1})}
