"""`python -m benchmarks.retrievers [flags]`: the retriever benchmark (see the package's docstring)."""
from benchmarks.retrievers import main

if __name__ == "__main__":
    main()
