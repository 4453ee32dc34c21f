"""Summarise a py-spy collapsed-stack profile: where a process's samples went.

    .venv/bin/python bench/profile_top.py PROFILE.txt [--depth N]

Prints the share of samples spent in each of a few areas (ORM, channel
layer, LLM stream parsing, WebSocket writes, ...: the innermost frame of the
sample that belongs to one of them), then the
functions that were on the CPU (the innermost frames) most often.
"""

import argparse
import collections

AREAS = {
    "django ORM + psycopg": ("django/db/", "psycopg/"),
    "asgiref sync_to_async (thread hops)": ("asgiref/sync.py",),
    "channels_redis + redis-py": ("channels_redis/", "redis/"),
    "openai client": ("openai/",),
    "httpx2 / httpcore2": ("httpx2/", "httpcore2/"),
    "daphne + autobahn + twisted (socket writes)": ("daphne/", "autobahn/", "twisted/"),
    "channels consumer machinery": ("channels/",),
    "chat app": ("chat/",),
    "pocketflow": ("pocketflow/",),
    "json": ("json/",),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    total = 0
    areas: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    idle = 0
    for line in open(args.profile):
        stack, _, count = line.rstrip().rpartition(" ")
        count = int(count)
        frames = stack.split(";")
        leaf = frames[-1]
        if "select" in leaf and ("selectors.py" in leaf or "epoll" in leaf) or "wait (threading.py" in leaf:
            idle += count
            continue
        total += count
        leaves[leaf] += count
        # The sample counts for the innermost frame that belongs to an area.
        for frame in reversed(frames):
            area = next((a for a, needles in AREAS.items() if any(n in frame for n in needles)), None)
            if area:
                areas[area] += count
                break
        else:
            areas["other (asyncio, stdlib)"] += count
    print(f"{total} busy samples ({idle} idle samples left out)")
    for area, count in areas.most_common():
        print(f"  {count / total:6.1%}  {area}")
    print("innermost frames:")
    for leaf, count in leaves.most_common(args.top):
        print(f"  {count / total:6.1%}  {leaf}")


if __name__ == "__main__":
    main()
