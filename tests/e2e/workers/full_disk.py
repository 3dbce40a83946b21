"""pretrain_gpt_ls.py on a simulated full disk: from the second checkpoint save on, every checkpoint file write
stores a few bytes and then fails with ENOSPC, as a write to a full file system does."""
from __future__ import annotations

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megatron_ls.training import checkpoint_save  # noqa: E402

_real_save = checkpoint_save.durable_torch_save
_saves_seen: set = set()


def _full_after_first_save(obj, path, zipfile=True):
    _saves_seen.add(os.path.basename(os.path.dirname(path.replace(os.sep + "rng" + os.sep, os.sep))))
    if len(_saves_seen) < 2:
        return _real_save(obj, path, zipfile)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 64)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


checkpoint_save.durable_torch_save = _full_after_first_save

if __name__ == "__main__":
    import pretrain_gpt_ls

    pretrain_gpt_ls.cli()
