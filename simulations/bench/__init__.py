"""Speed, scale and accuracy benchmarks, each `python -m simulations.bench.<name> --help`: they print a table
and write a JSON result into benchmarks/, most through `results.write_result`, which records the command and
the resolved settings beside the figures."""
