"""Write the teacher cache of a training run: the teacher's top-k log-probabilities per response token.

    python scripts/cache_teacher.py config=tiny teacher.cache_dir=cache/tiny_k64 teacher.top_k=64
    arkd-train config=tiny teacher.cache_dir=cache/tiny_k64 teacher.top_k=64     # reads it; no teacher is loaded

The same as ``arkd-cache-teacher`` (``arkd.cli.cache_teacher``); flags: --dtype, --shard-rows, --batch-size, --device.
"""

from arkd.cli.cache_teacher import main

if __name__ == "__main__":
    main()
