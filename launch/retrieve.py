"""Rank what launch/embed.py embedded against a text query.

  python launch/retrieve.py --model EXPORT --index xrays --query "Enlarged cardiac silhouette." --top 5
"""

import sys

from more_scale.cli import retrieve_main

if __name__ == "__main__":
    sys.exit(retrieve_main())
