"""Pack this machine's default corpus (the standard library's .py files, as data.py selects them) into
.data/stdlib<version>.tgz, to carry to a GPU machine whose Python has a trimmed standard library.

    python bench/pack_corpus.py            # then run the lease with carry=[".data"]; see h200_session.sh
"""

import os
import sys
import sysconfig
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import stdlib_files  # noqa: E402


def main():
    root = sysconfig.get_paths()["stdlib"]
    out = os.path.join(".data", f"stdlib{sys.version_info.major}{sys.version_info.minor}.tgz")
    os.makedirs(".data", exist_ok=True)
    files = stdlib_files()
    with tarfile.open(out + ".tmp", "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=os.path.relpath(path, root))
    os.replace(out + ".tmp", out)
    print(f"wrote {out}: {len(files)} files, {os.path.getsize(out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
