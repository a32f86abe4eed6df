"""`python -m yibao` is the same as the `yibao` console script."""

from yibao.cli import main

main()
