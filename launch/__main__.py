import sys


def main(argv=None):
    print("usage: python -m launch {run,submit,sweep,data,compare,checkpoint} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
