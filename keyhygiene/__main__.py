"""``python -m keyhygiene``: the same command line as the ``keyhygiene`` console script."""

from keyhygiene.launch import main

if __name__ == "__main__":
    main()
